"""``so8t train`` on the embedded default, on a local Llama checkpoint, and its one-line errors for bad input."""

import json
import re
import subprocess
import sys

import pytest
import torch
from cli_helpers import train as main
from peft import PeftModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from so8t import load_so8t_adapter
from so8t.models.demo import build_demo_tokenizer, demo_model_config

EXPECTED_OUTPUTS = [
    "adapter_config.json", "adapter_model.safetensors", "so8t/so8t_adapter.json", "so8t/so8t_adapter.safetensors",
    "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The console command with its defaults, only shorter: 30 steps instead of 150."""
    output = tmp_path_factory.mktemp("cli") / "run"
    command = [sys.executable, "-m", "so8t", "train", "--max-steps", "30", "--output-dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_the_embedded_default_trains_and_reports_where_its_outputs_went(default_run):
    output, result = default_run
    assert "30/30" in result.stderr  # the Trainer's progress bar
    assert f"outputs in {output}" in result.stdout
    # The Trainer saves a checkpoint at the last step: the summary names what the directory holds.
    assert (output / "checkpoint-30").is_dir() and "checkpoints checkpoint-30 (--resume)" in result.stdout
    for name in EXPECTED_OUTPUTS:
        assert (output / name).is_file(), name
    assert not any(path.name.startswith(".") for path in output.parent.iterdir())  # no staging left behind
    first, last = map(float, re.search(r"loss (\d+\.\d+) → (\d+\.\d+)", result.stdout).groups())
    assert last < first - 0.4


def test_the_outputs_load_back_onto_the_base_model(default_run):
    output, _ = default_run
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids("<think>") != tokenizer.unk_token_id
    torch.manual_seed(0)  # the demo base model is the seed-0 random init
    base = Phi3ForCausalLM(demo_model_config(tokenizer))
    model = PeftModel.from_pretrained(base, output)
    handle = load_so8t_adapter(model, output / "so8t")
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert handle.layer_indices == [1, 2, 3, 4] and handle.theta.abs().sum() > 0
    with torch.no_grad():
        logits = model(tokenizer("User: What is 2 + 2?\nAssistant: ", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()


def save_local_model(model, directory):
    model.save_pretrained(directory)
    build_demo_tokenizer().save_pretrained(directory)
    return str(directory)


def test_a_local_llama_checkpoint_trains_in_4bit_with_gradient_checkpointing(tmp_path, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model_dir = save_local_model(LlamaForCausalLM(config), tmp_path / "llama")
    output = tmp_path / "out"
    code = main(["--model", model_dir, "--load-in-4bit", "--gradient-checkpointing", "--max-steps", "3",
                 "--max-length", "64", "--batch-size", "4", "--warmup-steps", "1", "--output-dir", str(output)])
    assert code == 0, capsys.readouterr().err[-3000:]
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert json.loads((output / "so8t" / "so8t_adapter.json").read_text())["layer_indices"] == [1, 2]


class FlatConfig(PretrainedConfig):
    model_type = "so8t-test-flat"

    def __init__(self, vocab_size=260, hidden_size=32, num_hidden_layers=4, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class FlatForCausalLM(PreTrainedModel):
    """Claims 4 layers in its config but has no layer list: so8t cannot know where to put the gates."""

    config_class = FlatConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.head(self.embed(input_ids))


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_demo_tokenizer()
    odd = Phi3ForCausalLM(demo_model_config(tokenizer, hidden_size=36, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=3, num_key_value_heads=3))
    AutoConfig.register(FlatConfig.model_type, FlatConfig)
    AutoModelForCausalLM.register(FlatConfig, FlatForCausalLM)
    return {"odd": save_local_model(odd, root / "odd"), "flat": save_local_model(FlatForCausalLM(FlatConfig()), root / "flat")}


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def bad_inputs(tmp_path, models):
    good = json.dumps({"prompt": "What is 1 + 1?", "thinking": "1 + 1 = 2.", "answer": "2"})
    return {
        "missing data file": (["--data", str(tmp_path / "nope.jsonl")], r"data file .*nope\.jsonl not found"),
        "malformed line": (["--data", write(tmp_path / "bad.jsonl", [good, "{not json"])],
                           r"bad\.jsonl:2: malformed JSON"),
        "unknown layout": (["--data", write(tmp_path / "odd.jsonl", [json.dumps({"question": "q", "reply": "r"})])],
                           r"odd\.jsonl:1: unknown field layout \['question', 'reply'\]"),
        "hidden size": (["--model", models["odd"]], "hidden size 36 is not a multiple of 8"),
        "no decoder layers": (["--model", models["flat"]], "cannot find the decoder layers of FlatForCausalLM"),
        "layer out of range": (["--so8t-layers", "1,6"], r"layer index 6 is out of range: .* 6 decoder layers \(0 … 5\)"),
        "missing model": (["--model", str(tmp_path / "no-model")], "cannot load --model"),
        "unknown lora target": (["--lora-targets", "qkv_proj,nope_proj"], "--lora-targets nope_proj: no module of that name in the model"),
        "zero steps": (["--max-steps", "0"], "--max-steps must be at least 1"),
        "bad alpha target": (["--alpha-target", "1.5"], r"alpha_target=1.5: the target gate activation must be in \(0, 1\)"),
    }


@pytest.mark.parametrize("case", [
    "missing data file", "malformed line", "unknown layout", "hidden size", "no decoder layers",
    "layer out of range", "missing model", "unknown lora target", "zero steps", "bad alpha target",
])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, bad_models, capsys):
    arguments, message = bad_inputs(tmp_path, bad_models)[case]
    output = tmp_path / "out"
    assert main([*arguments, "--output-dir", str(output)]) == 2
    stderr = capsys.readouterr().err  # may also hold transformers' weight-loading progress bar
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("so8t train: error: ") and "Traceback" not in stderr, stderr
    assert re.search(message, errors[0]), errors[0]
    assert not output.exists()
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())


def test_an_existing_output_dir_is_kept_unless_overwrite_is_given(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    assert main(["--output-dir", str(output), "--max-steps", "1"]) == 2
    assert "already exists and is not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (output / "precious.txt").read_text() == "keep me"
    threads = torch.get_num_threads()
    assert main(["--output-dir", str(output), "--max-steps", "1", "--overwrite"]) == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting ends with the command
    assert not (output / "precious.txt").exists() and (output / "so8t" / "so8t_adapter.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_bad_layer_lists_are_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--so8t-layers", "3,x"])
    assert exit_info.value.code == 2
    assert "expected comma-separated layer indices like 3,7,11, got '3,x'" in capsys.readouterr().err
