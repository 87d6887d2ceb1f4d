"""The other gated architectures in vLLM: a tiny Mistral and a tiny Qwen2 (hidden 128, 4 heads of 32: vLLM's
CPU attention needs a head size of 32 or more), trained 3 steps with gates away from the identity, exported,
and generated greedily by vLLM and by transformers. Llama is tests/test_vllm.py's (the real SmolLM2),
Phi-3 tests/test_vllm_serve.py's (the embedded demo)."""

import pytest
import torch
from serve_helpers import one_torch_thread  # noqa: F401  (autouse: 1 torch thread)
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config
from vllm_helpers import generate_greedy

import so8t  # noqa: F401  (registers the gated classes with the Auto classes)
from cli_helpers import run_so8t, train
from so8t.models.demo import build_demo_tokenizer
from so8t.models.inference import load_for_inference

pytestmark = pytest.mark.timeout(1200)  # a vLLM engine: 25 s to start idle, minutes on a loaded machine
PROMPTS = [[5, 17, 99, 3, 44, 250, 7, 81, 12], [100, 101, 102, 103, 104, 105]]
NEW_TOKENS = 16
# float32, the same model: transformers and vLLM agreed to 5 decimals on every step here.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(params=[MistralConfig, Qwen2Config], ids=["mistral", "qwen2"])
def export(request, tmp_path):
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = request.param(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert train(["--model", str(base), "--max-steps", "3", "--save-steps", "0", "--warmup-steps", "1",
                  "--theta-init-std", "0.3", "--no-monitor", "--output-dir", str(tmp_path / "run")]) == 0
    assert run_so8t("export", [str(tmp_path / "run"), "--output-dir", str(tmp_path / "export")]) == 0
    return base, tmp_path / "run", tmp_path / "export"


@torch.no_grad()
def greedy(model) -> tuple[list[list[int]], list[list[float]]]:
    tokens, logprobs = [], []
    for prompt in PROMPTS:
        sequence, values = list(prompt), []
        for _ in range(NEW_TOKENS):
            row = torch.log_softmax(model(torch.tensor([sequence])).logits[0, -1].double(), -1)
            sequence.append(int(row.argmax()))
            values.append(row.max().item())
        tokens.append(sequence[len(prompt):])
        logprobs.append(values)
    return tokens, logprobs


def test_vllm_generates_what_transformers_generates(export, tmp_path):
    base, run, export = export
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(model).__name__ in ("So8tMistralForCausalLM", "So8tQwen2ForCausalLM")
    tokens, logprobs = greedy(model)
    result = generate_greedy(export, PROMPTS, NEW_TOKENS, tmp_path)
    assert result["tokens"] == tokens
    assert max(abs(a - b) for mine, theirs in zip(logprobs, result["logprobs"]) for a, b in zip(mine, theirs)) \
        <= LOGPROB_TOLERANCE
    ungated = load_for_inference(str(base), str(run))  # the run without its gates answers otherwise
    ungated.handle.detach()
    flat = [value for row in logprobs for value in row]
    assert [value for row in greedy(ungated.model.eval())[1] for value in row] != pytest.approx(flat, abs=1e-3)
