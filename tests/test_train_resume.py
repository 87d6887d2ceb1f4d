"""Checkpoints and resume, as a user meets them: a long run killed with SIGKILL after its step-5 checkpoint,
resumed, ends with the adapter of a run that was never interrupted and a monitoring series with every
step once; while it runs its monitoring is readable and its output directory is its own."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import report
from cli_helpers import train as main
from monitor_helpers import read_metrics
from safetensors.torch import load_file

from so8t.training.checkpoints import CHECKPOINT_FILE, find_checkpoint, rotate
from so8t.training.outputs import LOCK_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
# 3 warmup steps: α is scheduled before the checkpoint and trained after it.
RUN = ["--save-steps", "5", "--warmup-steps", "3", "--monitor-interval", "1", "--no-monitor-plots",
       "--batch-size", "4", "--max-length", "64"]
FINAL_FILES = ("adapter_model.safetensors", "so8t/so8t_adapter.safetensors")


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight") / "run"
    assert main([*RUN, "--max-steps", "10", "--output-dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run meant for 300 steps, killed with SIGKILL once checkpoint-5 is complete, then resumed from it
    for 10 steps in all. With a constant learning rate, the step count changes nothing before step 10."""
    output = tmp_path_factory.mktemp("killed") / "run"
    command = [sys.executable, "-m", "so8t", "train", *RUN, "--max-steps", "300", "--save-total-limit", "0",
               "--output-dir", str(output)]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(output / "checkpoint-5" / CHECKPOINT_FILE, process)
        during = {"report": report([str(output)]), "second run stderr": io.StringIO()}
        with contextlib.redirect_stderr(during["second run stderr"]):
            during["second run"] = main([*RUN, "--max-steps", "10", "--output-dir", str(output), "--overwrite"])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed = {"lock left": (output / LOCK_FILE).exists(),
              "steps recorded": [s["step"] for s in read_metrics(output / "monitoring" / "metrics.jsonl")[1]]}
    code = main([*RUN, "--max-steps", "10", "--output-dir", str(output), "--resume", str(output / "checkpoint-5")])
    return output, during, killed, code


def test_a_second_run_into_a_running_runs_directory_is_refused(killed_and_resumed):
    output, during, _, _ = killed_and_resumed
    assert during["second run"] == 2
    lines = during["second run stderr"].getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"so8t train: error: --output-dir {output} is in use by a running "
                                                   "so8t train (pid "), lines


def test_monitoring_is_readable_while_the_run_trains(killed_and_resumed):
    _, during, _, _ = killed_and_resumed
    assert during["report"] == 0


def test_the_killed_runs_lock_is_taken_over_and_the_resume_succeeds(killed_and_resumed):
    output, _, killed, code = killed_and_resumed
    assert killed["lock left"] and killed["steps recorded"][:5] == [1, 2, 3, 4, 5]
    assert code == 0
    assert not (output / LOCK_FILE).exists()


def test_resuming_after_kill_9_gives_the_uninterrupted_runs_adapter(straight_run, killed_and_resumed):
    resumed, *_ = killed_and_resumed
    for name in FINAL_FILES:
        expected, actual = load_file(straight_run / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    gates = load_file(resumed / "so8t" / "so8t_adapter.safetensors")
    assert not torch.allclose(gates["alpha"], torch.tensor(-2.1972), atol=1e-4)  # trained after the 3 warmup steps
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 10


def test_the_resumed_monitoring_series_has_every_step_once(straight_run, killed_and_resumed):
    resumed, *_ = killed_and_resumed
    _, samples, _ = read_metrics(resumed / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in samples] == list(range(1, 11))
    _, straight, _ = read_metrics(straight_run / "monitoring" / "metrics.jsonl")
    for before, after in zip(straight, samples):
        assert before["alpha"].tolist() == pytest.approx(after["alpha"].tolist(), rel=1e-6)


def test_checkpoints_hold_gates_optimizer_scheduler_rng_and_monitor_state(straight_run):
    checkpoint = straight_run / "checkpoint-5"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "so8t/so8t_adapter.safetensors", "monitoring/metrics.jsonl"):
        assert (checkpoint / name).is_file(), name
    record = json.loads((checkpoint / CHECKPOINT_FILE).read_text())
    assert record["step"] == 5
    assert record["alpha_annealing"] == {"optimizer_steps_done": 5, "warmup_steps": 3, "alpha_frozen": False}
    _, samples, _ = read_metrics(checkpoint / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in samples] == [1, 2, 3, 4, 5]


def test_resume_latest_takes_the_newest_complete_checkpoint_and_rotation_drops_cut_short_ones(tmp_path):
    for step in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 20:  # checkpoint-20 was cut short by a kill
            (tmp_path / f"checkpoint-{step}" / CHECKPOINT_FILE).write_text("{}")
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-15"
    rotate(tmp_path, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]


def test_resume_errors_are_one_line(tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    assert main([*RUN, "--max-steps", "2", "--output-dir", str(output), "--resume"]) == 2
    assert f"--resume latest: no complete checkpoint in {output}" in capsys.readouterr().err
    assert main([*RUN, "--max-steps", "2", "--output-dir", str(output), "--resume", str(tmp_path)]) == 2
    assert "not a complete so8t checkpoint" in capsys.readouterr().err
