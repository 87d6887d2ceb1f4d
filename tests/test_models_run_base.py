"""``so8t serve --adapter RUN`` and ``so8t generate --adapter RUN`` without ``--model`` run the base model
the run was trained on (the demo, a local directory, a hub id, a converted .gguf file), the default model
only when the run recorded none; an explicit ``--model`` wins; a recorded base that is gone is one line
naming it and ``--model``, exit status 2, before anything loads."""

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from so8t.commands.main import main
from so8t.commands.model_options import inference_model
from so8t.errors import SO8TError
from so8t.models.demo import build_demo_tokenizer
from so8t.models.inference import served_model_name
from so8t.models.run_base import PEFT_CONFIG_FILE, run_base_model
from so8t.models.source import CONVERTED_MARKER, default_model, file_sha256

TRAIN = ["--max-steps", "1", "--warmup-steps", "1", "--max-length", "64", "--batch-size", "2", "--no-monitor"]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class Runs(NamedTuple):
    demo: Path  # trained on --model demo
    base: Path  # the tiny Llama's directory
    llama: Path  # trained on it
    chat_command: list[str]  # the so8t generate command so8t train printed for it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run on the demo and one on a tiny Llama saved as a local directory (another architecture and
    vocabulary than the demo's and the default model's: its LoRA loads onto its own base only)."""
    folder = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = folder / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(base)
    build_demo_tokenizer().save_pretrained(base)
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        assert main(["train", "--model", "demo", "--output-dir", str(folder / "demo-run"), *TRAIN]) == 0
        with contextlib.redirect_stdout(printed):
            assert main(["train", "--model", str(base), "--output-dir", str(folder / "llama-run"), *TRAIN]) == 0
    finally:
        torch.set_num_threads(threads)
    chat = next(line for line in printed.getvalue().splitlines() if line.startswith("chat with it: "))
    return Runs(folder / "demo-run", base, folder / "llama-run", shlex.split(chat.removeprefix("chat with it: ")))


def recording(base: str | None, folder):
    """A run folder whose adapter_config.json records ``base``, as peft writes it."""
    folder.mkdir()
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return str(folder)


def test_without_model_the_base_the_run_recorded_and_an_explicit_model_wins(runs, tmp_path):
    demo_run, base, llama_run = runs.demo, runs.base, runs.llama
    assert inference_model(None, str(llama_run)) == str(base.resolve())
    assert inference_model(None, str(demo_run)) == "demo"
    (checkpoint,) = demo_run.glob("checkpoint-*")  # the demo's seed is recorded beside the checkpoints
    assert inference_model(None, str(checkpoint)) == "demo"
    assert inference_model("demo", str(llama_run)) == "demo"
    assert inference_model(str(base), str(demo_run)) == str(base)
    assert inference_model(None, recording(None, tmp_path / "nothing-recorded")) == default_model()
    assert inference_model(None, None) == default_model()


def test_a_recorded_base_that_is_gone_names_itself_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    moved = tmp_path / "moved-away"
    with pytest.raises(SO8TError, match=rf"^--adapter \S+ was trained on {moved}, which no longer exists: pass --model"):
        inference_model(None, recording(str(moved), tmp_path / "run"))
    with pytest.raises(SO8TError, match=r"trained on nobody/no-such-model: .*not in the Hugging Face cache.*--model"):
        inference_model(None, recording("nobody/no-such-model", tmp_path / "hub-run"))


def test_a_converted_gguf_base_is_named_after_its_file_and_found_again_once_the_cache_is_cleared(tmp_path):
    converted = tmp_path / "gguf" / ("ab" * 32)
    converted.mkdir(parents=True)
    (converted / CONVERTED_MARKER).write_text("/models/SmolLM2-135M-Instruct.Q4_1.gguf\n")
    run = recording(str(converted), tmp_path / "run-20261204")
    assert run_base_model(run) == str(converted)
    assert served_model_name(str(converted), run) == "smollm2-135m-instruct+run-20261204"
    # The default model's directory, deleted with the cache: its file (converted again when it loads).
    cleared = tmp_path / "cleared" / "gguf" / file_sha256(Path(default_model()))
    assert run_base_model(recording(str(cleared), tmp_path / "default-run")) == default_model()
    with pytest.raises(SO8TError, match="which no longer exists"):
        run_base_model(recording(str(tmp_path / "cleared" / "gguf" / ("cd" * 32)), tmp_path / "other-run"))


def test_serve_and_generate_load_the_recorded_base_or_say_it_is_gone(runs, tmp_path, monkeypatch, capsys):
    base, llama_run = runs.base, runs.llama
    loaded = []

    def load(model, *args, **kwargs):
        loaded.append(model)
        raise RuntimeError("not loaded in this test")

    monkeypatch.setattr("so8t.serve.engines.hf.HFEngine.load", load)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    audit_db = tmp_path / "db" / "audit.db"
    serve = ["serve", "--port", "0", "--audit-db", str(audit_db), "--adapter"]
    assert main([*serve, str(llama_run)]) == 2
    assert main(["generate", "--adapter", str(llama_run), "hi"]) == 2
    assert loaded == [str(base.resolve())] * 2
    capsys.readouterr()
    moved = shutil.copytree(llama_run, tmp_path / "moved-run")
    config = json.loads((moved / PEFT_CONFIG_FILE).read_text())
    (moved / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    for command in (serve, ["generate", "--adapter"]):
        assert main([*command, str(moved), *(["hi"] if command[0] == "generate" else [])]) == 2
        [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("so8t ")]
        assert line == (f"so8t {command[0]}: error: --adapter {moved} was trained on {tmp_path / 'gone'}, which no "
                        "longer exists: pass --model with that base model (its hub id, directory or .gguf file)")
    assert loaded == [str(base.resolve())] * 2 and not audit_db.parent.exists()


def test_the_chat_command_train_prints_runs_from_anywhere_on_the_local_model(runs, tmp_path):
    """The command needs no --model (the run recorded its base), so it works from another folder."""
    command = runs.chat_command
    assert command[:2] == ["so8t", "generate"] and "--model" not in command
    result = subprocess.run([sys.executable, "-m", "so8t", *command[1:], "--max-new-tokens", "4"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s]" in result.stderr
    chat = subprocess.run([sys.executable, "-m", "so8t", "generate", "--adapter", str(runs.llama), "--max-new-tokens", "4"],
                          input="hi\n/exit\n", cwd=tmp_path, capture_output=True, text=True, timeout=300, env=OFFLINE)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "chatting with tiny-llama+llama-run" in chat.stderr
