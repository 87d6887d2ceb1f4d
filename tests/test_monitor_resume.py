"""Crash safety and resume with a real Trainer: ``kill -9`` leaves metrics.jsonl readable, an exception
still finishes the files, and resuming from a checkpoint appends, drops what was recorded after it, and
keeps every series monotone."""

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
from child_processes import run, started
from cli_helpers import report
from monitor_helpers import make_trainer, read_metrics, tiny_gated_model

from so8t.monitor import SO8TMonitorCallback

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

TRAIN_UNTIL_KILLED = textwrap.dedent("""
    import sys
    import conftest  # offline hub, Triton interpreter: the tests' environment
    from monitor_helpers import make_trainer, tiny_gated_model
    from so8t.monitor import SO8TMonitorCallback

    model, handle = tiny_gated_model()
    # No fsync and no export for the whole run: only what each sample's write left with the OS survives.
    monitor = SO8TMonitorCallback(interval=1, flush_every=1_000_000, plots=False)
    make_trainer(model, handle, sys.argv[1], max_steps=100_000, monitor=monitor).train()
""")


FAIL_AT_STEP_5 = textwrap.dedent("""
    import sys
    import conftest  # offline hub, Triton interpreter: the tests' environment
    from transformers import TrainerCallback
    from monitor_helpers import make_trainer, tiny_gated_model
    from so8t.monitor import SO8TMonitorCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("boom at step 5")

    model, handle = tiny_gated_model()
    monitor = SO8TMonitorCallback(interval=1, flush_every=1_000_000, plots=False)
    make_trainer(model, handle, sys.argv[1], max_steps=50, monitor=monitor, callbacks=[Boom()]).train()
""")


def script_command(script: str, directory: Path) -> tuple[list[str], dict]:
    """``python -c SCRIPT DIRECTORY`` and its environment: the tests' helpers importable."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)]))
    return [sys.executable, "-c", script, str(directory)], environment


def sample_lines(path: Path) -> int:
    return path.read_text().count('"type":"sample"') if path.is_file() else 0


def test_kill_9_leaves_a_readable_metrics_file(tmp_path):
    output = tmp_path / "run"
    metrics = output / "monitoring" / "metrics.jsonl"
    command, environment = script_command(TRAIN_UNTIL_KILLED, output)
    with started(command, tmp_path / "logs", env=environment) as child:
        deadline = time.monotonic() + 150
        while sample_lines(metrics) < 8:
            assert child.process.poll() is None, child.stderr[-3000:]
            assert time.monotonic() < deadline, "the training subprocess recorded too few samples in time"
            time.sleep(0.05)
        child.send(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    info, samples, _ = read_metrics(metrics)
    steps = [sample["step"] for sample in samples]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8
    assert info.layers == (1, 2)
    assert report([str(output)]) == 0  # plots and summary from what the killed run left


def test_an_exception_out_of_training_still_finishes_the_files(tmp_path):
    command, environment = script_command(FAIL_AT_STEP_5, tmp_path)
    result = run(command, timeout=300, env=environment)
    assert result.returncode != 0 and "boom at step 5" in result.stderr, result.stderr[-3000:]
    monitoring = tmp_path / "monitoring"
    _, samples, _ = read_metrics(monitoring / "metrics.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 3, 4, 5]
    summary = json.loads((monitoring / "summary.json").read_text())
    assert summary["samples_recorded"] == 5 and summary["last_step"] == 5
    assert pd.read_csv(monitoring / "timeseries.csv")["step"].tolist() == [1, 2, 3, 4, 5]


def test_resume_from_a_checkpoint_appends_and_keeps_steps_monotone(tmp_path):
    model, handle = tiny_gated_model()
    options = dict(interval=1, flush_every=3, plots=False)
    make_trainer(model, handle, tmp_path, max_steps=8, monitor=SO8TMonitorCallback(**options),
                 save_strategy="steps", save_steps=4).train()
    _, first_run, _ = read_metrics(tmp_path / "monitoring" / "metrics.jsonl")
    assert [s["step"] for s in first_run] == list(range(1, 9))

    model, handle = tiny_gated_model(seed=1)
    make_trainer(model, handle, tmp_path, max_steps=8, monitor=SO8TMonitorCallback(**options),
                 save_strategy="no").train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    metrics = tmp_path / "monitoring" / "metrics.jsonl"
    _, samples, _ = read_metrics(metrics)
    assert [s["step"] for s in samples] == list(range(1, 9))
    # Steps 1-4 are the first run's records, kept as they were; 5-8 were recorded again after the resume.
    assert [s["time"] for s in samples[:4]] == [s["time"] for s in first_run[:4]]
    assert all(new["time"] > old["time"] for new, old in zip(samples[4:], first_run[4:]))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "meta"] == [0, 4]
    all_steps = [r["step"] for r in records if r["type"] == "sample"]
    assert all_steps == sorted(all_steps)
    table = pd.read_csv(tmp_path / "monitoring" / "timeseries.csv")
    assert table["step"].tolist() == list(range(1, 9))
    assert np.all(np.diff(np.load(tmp_path / "monitoring" / "timeseries.npz")["step"]) > 0)
    summary = json.loads((tmp_path / "monitoring" / "summary.json").read_text())
    assert summary["samples_recorded"] == 8 and summary["first_step"] == 1 and summary["last_step"] == 8
