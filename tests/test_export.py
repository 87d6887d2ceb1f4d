"""``so8t export`` on the embedded demo model: the folder transformers loads gives the run's logits (base +
LoRA + gates), from a finished run, a checkpoint, a judge, in bf16 and without gates; ``import so8t`` is
all transformers needs; bad input is one line, exit 2, nothing written. The real SmolLM2 and vLLM are in
tests/test_vllm.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import so8t  # noqa: F401  (registers the gated classes with the Auto classes)
import child_processes
from cli_helpers import run_so8t, train
from so8t.errors import SO8TError
from so8t.models import export
from so8t.models.inference import load_for_inference

IDS = torch.tensor([[5, 17, 99, 3, 44, 250, 7, 81, 12]])
TRAIN = ["--model", "demo", "--max-steps", "3", "--save-steps", "2", "--warmup-steps", "1", "--batch-size", "4", "--max-length", "64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A demo run with gates moved away from the identity (θ ~ N(0, 0.3), σ(α) = 0.1 after warmup)."""
    output = tmp_path_factory.mktemp("export") / "run"
    assert train([*TRAIN, "--theta-init-std", "0.3", "--seed", "3", "--output-dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("export") / "model"
    assert run_so8t("export", [str(run), "--output-dir", str(target)]) == 0
    return target


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_the_export_is_a_gated_model_folder(exported, run):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "so8t_phi3" and config["architectures"] == ["So8tPhi3ForCausalLM"]
    assert config["so8t"]["layers"] == [1, 2, 3, 4] and config["so8t"]["block_size"] == 8
    assert config["so8t"]["run"] == str(run)
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "model.safetensors"} <= {
        path.name for path in exported.iterdir()}
    weights = load_file(exported / "model.safetensors")
    assert weights["model.layers.2.so8t_gate.theta"].shape == (16, 28)
    assert weights["model.layers.2.so8t_gate.alpha"].dtype == torch.float32
    assert not any("lora" in name or "so8t_gates" in name for name in weights)


def test_transformers_loads_the_export_with_the_runs_logits(exported, run):
    served = load_for_inference("demo", str(run))  # base (seed 3) + LoRA merged + gates, as so8t serve runs it
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "So8tPhi3ForCausalLM"
    expected = logits(served.model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)
    served.handle.detach()  # the gates are in the export's logits, not dropped
    assert (logits(served.model) - expected).abs().max() > 1e-2


def test_a_checkpoint_exports_with_its_own_weights(run, exported, tmp_path):
    target = tmp_path / "from-checkpoint"
    assert run_so8t("export", [str(run / "checkpoint-2"), "--output-dir", str(target)]) == 0
    expected = logits(load_for_inference("demo", str(run / "checkpoint-2")).model)
    from_checkpoint = logits(AutoModelForCausalLM.from_pretrained(target))
    torch.testing.assert_close(from_checkpoint, expected, rtol=1e-6, atol=1e-6)
    assert (from_checkpoint - logits(AutoModelForCausalLM.from_pretrained(exported))).abs().max() > 1e-4


def test_off_a_terminal_the_export_prints_its_lines_without_progress_bars(run, tmp_path):
    result = child_processes.run([sys.executable, "-m", "so8t", "export", str(run), "--output-dir",
                                  str(tmp_path / "model")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "so8t export: writing" in result.stderr
    assert "\r" not in result.stderr and "Loading weights" not in result.stderr and "shards" not in result.stderr


def test_a_bfloat16_export_keeps_the_gates_in_float32(run, exported, tmp_path):
    target = tmp_path / "bf16"
    assert run_so8t("export", [str(run), "--output-dir", str(target), "--dtype", "bfloat16"]) == 0
    with safe_open(target / "model.safetensors", "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes["model.layers.1.so8t_gate.theta"] == "F32" and dtypes["model.layers.1.so8t_gate.alpha"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.model.layers[1].so8t_gate.theta.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    full = logits(AutoModelForCausalLM.from_pretrained(exported))
    assert (logits(model).float() - full).abs().max() < 0.05 * full.abs().max()


def test_a_run_without_gates_exports_as_its_base_architecture(tmp_path):
    output = tmp_path / "run"
    assert train([*TRAIN, "--no-so8t", "--output-dir", str(output)]) == 0
    target = tmp_path / "model"
    assert run_so8t("export", [str(output), "--output-dir", str(target)]) == 0
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "phi3" and "so8t" not in config
    model = AutoModelForCausalLM.from_pretrained(target)
    assert type(model).__name__ == "Phi3ForCausalLM"
    torch.testing.assert_close(logits(model), logits(load_for_inference("demo", str(output)).model))


def test_a_judge_exports_as_a_sequence_classifier(tmp_path):
    from so8t.judge.judge import load_classifier

    output = tmp_path / "judge"
    assert train(["--task", "classify", "--model", "demo", "--max-steps", "3", "--theta-init-std", "0.3", "--warmup-steps", "1",
                  "--eval-fraction", "0.2", "--output-dir", str(output)]) == 0
    target = tmp_path / "model"
    assert run_so8t("export", [str(output), "--output-dir", str(target)]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(target)
    assert type(model).__name__ == "So8tPhi3ForSequenceClassification"
    judge, _ = load_classifier(output)
    torch.testing.assert_close(logits(model), logits(judge), rtol=1e-6, atol=1e-6)
    assert model.config.id2label == judge.config.id2label
    assert (target / export.CALIBRATION_FILE).is_file()


def test_a_lora_judge_whose_base_moved_exports_with_model(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from so8t.models.demo import build_demo_tokenizer

    torch.manual_seed(0)
    base = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    build_demo_tokenizer().save_pretrained(base)
    output = tmp_path / "judge"
    assert train(["--task", "classify", "--model", str(base), "--max-steps", "2", "--warmup-steps", "1",
                  "--theta-init-std", "0.3", "--eval-fraction", "0.2", "--output-dir", str(output)]) == 0
    moved = base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert run_so8t("export", [str(output), "--output-dir", str(tmp_path / "refused")]) == 2
    assert "pass --model" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    target = tmp_path / "model"
    assert run_so8t("export", [str(output), "--output-dir", str(target), "--model", str(moved)]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(target)
    assert type(model).__name__ == "So8tLlamaForSequenceClassification"
    from so8t.judge.judge import load_classifier

    judge, _ = load_classifier(output, str(moved))
    torch.testing.assert_close(logits(model), logits(judge), rtol=1e-6, atol=1e-6)


def test_import_so8t_before_transformers_registers_the_gated_classes(exported):
    """In a fresh process: ``import so8t`` first (transformers not imported yet), then the Auto classes;
    without so8t transformers refuses the folder loudly instead of loading the base without its gates."""
    load = ("from transformers import AutoModelForCausalLM\n"
            f"print(type(AutoModelForCausalLM.from_pretrained({str(exported)!r})).__name__)\n")
    with_so8t = subprocess.run([sys.executable, "-c", "import so8t\n" + load], capture_output=True, text=True,
                               timeout=300)
    assert with_so8t.stdout.split() == ["So8tPhi3ForCausalLM"], with_so8t.stderr
    without = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert without.returncode != 0 and "so8t_phi3" in without.stderr, without.stdout


def test_missing_gate_tensors_refuse_to_load(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.3.so8t_gate.theta"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SO8TError, match="model.layers.3.so8t_gate.theta"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_the_fallback_chat_template_renders_what_training_rendered(exported):
    from transformers import AutoTokenizer

    from so8t.data.dataset import render_prompt
    from so8t.models.demo import build_demo_tokenizer

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert render_prompt(AutoTokenizer.from_pretrained(exported), chat) == render_prompt(build_demo_tokenizer(), chat)


def _unfinished(run: Path, tmp: Path) -> Path:
    copy = tmp / "unfinished"
    shutil.copytree(run, copy)
    (copy / export.TRAINER_STATE_FILE).unlink()
    return copy


def _cut_short(run: Path, tmp: Path) -> Path:
    copy = tmp / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", copy)
    (copy / export.CHECKPOINT_FILE).unlink()
    return copy


def _moved_base(run: Path, tmp: Path) -> Path:
    copy = tmp / "moved-base"
    shutil.copytree(run, copy)
    (copy / "embedded_base.json").unlink()  # a run on a model directory records only peft's base
    adapter = json.loads((copy / export.PEFT_CONFIG_FILE).read_text())
    (copy / export.PEFT_CONFIG_FILE).write_text(json.dumps({**adapter, "base_model_name_or_path": str(tmp / "gone")}))
    return copy


@pytest.mark.parametrize("make, message", [
    (lambda run, tmp: tmp / "nowhere", "no such directory"),
    (_unfinished, "not a finished so8t train run (its final files are not published); export one of its "
                  "checkpoints (checkpoint-2, checkpoint-3)"),
    (_cut_short, "not a complete checkpoint (no so8t_checkpoint.json"),
    (_moved_base, "moved-base was trained on"),
], ids=["missing", "unfinished", "checkpoint-cut-short", "base-moved"])
def test_bad_runs_are_one_line_exit_2_and_nothing_written(run, tmp_path, capsys, make, message):
    source = make(run, tmp_path)
    target = tmp_path / "out" / "model"
    capsys.readouterr()
    assert run_so8t("export", [str(source), "--output-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("so8t export: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_dir_is_refused_and_left_as_it_was(run, tmp_path, capsys):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert run_so8t("export", [str(run), "--output-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"so8t export: error: --output-dir {target} already exists and is not empty"
    assert [path.name for path in target.iterdir()] == ["notes.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging folder left beside it


def test_the_run_file_names_are_the_training_sides():
    from so8t.judge.calibration import CALIBRATION_FILE
    from so8t.training import checkpoints, outputs

    assert export.TRAINER_STATE_FILE == outputs.TRAINER_STATE_FILE
    assert export.CHECKPOINT_FILE == checkpoints.CHECKPOINT_FILE
    assert export.CHECKPOINT_PREFIX == outputs.CHECKPOINT_PREFIX
    assert export.PUBLISH_DIR == outputs.PUBLISH_DIR
    assert export.CALIBRATION_FILE == CALIBRATION_FILE
    from so8t.commands import export as command

    assert command.DTYPES == export.DTYPES
