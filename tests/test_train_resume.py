"""Checkpoints and resume, as a user meets them: a long run killed with SIGKILL after its step-5 checkpoint,
or stopped by SIGTERM (a preempting scheduler) or SIGINT (also when its shell ignored SIGINT), resumed,
ends with the adapter of a run that was never interrupted and a monitoring series with every step once;
while it runs its monitoring is readable and its output directory is its own."""

import contextlib
import io
import json
import re
import signal
import time

import pytest
import torch
from cli_helpers import report
from cli_helpers import train as main
from monitor_helpers import read_metrics
from safetensors.torch import load_file
from child_processes import so8t_train

from so8t.training.checkpoints import CHECKPOINT_FILE, find_checkpoint, rotate
from so8t.training.outputs import LOCK_FILE

# 3 warmup steps: α is scheduled before the checkpoint and trained after it.
RUN = ["--model", "demo", "--save-steps", "5", "--warmup-steps", "3", "--monitor-interval", "1", "--no-monitor-plots",
       "--batch-size", "4", "--max-length", "64"]
# The straight run's length: room for the steps an interrupted run takes after its step-5 checkpoint
# before a signal lands (1-3 on a loaded machine). With a constant learning rate, the step count a run
# was started with changes nothing before its last step.
STEPS = 20
FINAL_FILES = ("adapter_model.safetensors", "so8t/so8t_adapter.safetensors")
LONG_RUN = [*RUN, "--max-steps", "300", "--save-total-limit", "0"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight") / "run"
    assert main([*RUN, "--max-steps", str(STEPS), "--save-total-limit", "0", "--output-dir", str(output)]) == 0
    return output


def resume(output, checkpoint: str = "latest") -> int:
    return main([*RUN, "--max-steps", str(STEPS), "--output-dir", str(output), "--resume", checkpoint])


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run meant for 300 steps, killed with SIGKILL once checkpoint-5 is complete, then resumed from it."""
    output = tmp_path_factory.mktemp("killed") / "run"
    with so8t_train([*LONG_RUN, "--output-dir", str(output)], output.parent / "logs") as child:
        child.wait_for(output / "checkpoint-5" / CHECKPOINT_FILE)
        during = {"report": report([str(output)]), "second run stderr": io.StringIO()}
        with contextlib.redirect_stderr(during["second run stderr"]):
            during["second run"] = main([*RUN, "--max-steps", str(STEPS), "--output-dir", str(output), "--overwrite"])
        child.send(signal.SIGKILL)
        assert child.wait(60) == -signal.SIGKILL
    killed = {"lock left": (output / LOCK_FILE).exists(),
              "steps recorded": [s["step"] for s in read_metrics(output / "monitoring" / "metrics.jsonl")[1]]}
    return output, during, killed, resume(output, str(output / "checkpoint-5"))


def stop_and_resume(directory, signum: int, sigint_ignored: bool = False) -> dict:
    """A run meant for 300 steps, sent ``signum`` once checkpoint-5 is complete, then resumed (latest)."""
    output = directory / "run"
    with so8t_train([*LONG_RUN, "--output-dir", str(output)], directory / "logs", sigint_ignored) as child:
        child.wait_for(output / "checkpoint-5" / CHECKPOINT_FILE)
        sent = time.monotonic()
        child.send(signum)
        code = child.wait(120)
        stopped = {"code": code, "seconds": time.monotonic() - sent, "stderr": child.stderr,
                   "lock left": (output / LOCK_FILE).exists(), "published": (output / FINAL_FILES[0]).exists(),
                   "steps recorded": [s["step"] for s in read_metrics(output / "monitoring" / "metrics.jsonl")[1]]}
    closing = stopped["stderr"].rstrip().splitlines()[-1]
    step = int(re.fullmatch(r"so8t train: stopped by \w+ after step (\d+); .*", closing).group(1))
    checkpoint = output / f"checkpoint-{step}"
    stopped.update(closing=closing, step=step, complete=(checkpoint / CHECKPOINT_FILE).is_file(),
                   state=json.loads((checkpoint / "trainer_state.json").read_text()))
    assert step < STEPS, f"the signal landed after step {step}: the straight run is too short to compare"
    return {"output": output, "stopped": stopped, "resumed": resume(output)}


@pytest.fixture(scope="module")
def stopped_by_sigterm(tmp_path_factory):
    return stop_and_resume(tmp_path_factory.mktemp("sigterm"), signal.SIGTERM)


@pytest.fixture(scope="module")
def stopped_by_sigint_while_ignored(tmp_path_factory):
    """SIGINT to a run whose shell ignored SIGINT (`so8t train … &` in a script): Python raises no
    KeyboardInterrupt there, so8t stops all the same."""
    return stop_and_resume(tmp_path_factory.mktemp("sigint"), signal.SIGINT, sigint_ignored=True)


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


def assert_same_adapter(straight, resumed) -> None:
    for name in FINAL_FILES:
        expected, actual = load_file(straight / name), load_file(resumed / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{name}: {key}"


def test_resuming_after_kill_9_gives_the_uninterrupted_runs_adapter(straight_run, killed_and_resumed):
    resumed, *_ = killed_and_resumed
    assert_same_adapter(straight_run, resumed)
    gates = load_file(resumed / "so8t" / "so8t_adapter.safetensors")
    assert not torch.allclose(gates["alpha"], torch.tensor(-2.1972), atol=1e-4)  # trained after the 3 warmup steps
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


STOPPED = [("stopped_by_sigterm", signal.SIGTERM), ("stopped_by_sigint_while_ignored", signal.SIGINT)]


@pytest.mark.parametrize("fixture, signum", STOPPED, ids=["SIGTERM", "SIGINT while ignored"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_a_closing_line_and_no_lock(fixture, signum, request):
    run = request.getfixturevalue(fixture)
    output, stopped = run["output"], run["stopped"]
    step = stopped["step"]
    assert stopped["code"] == 128 + signum, stopped["stderr"][-3000:]  # 143, 130
    assert "Traceback" not in stopped["stderr"] and "KeyboardInterrupt" not in stopped["stderr"]
    kept = ", ".join(f"checkpoint-{n}" for n in sorted({*range(5, step + 1, 5), step}))
    assert stopped["closing"] == (f"so8t train: stopped by {signal.Signals(signum).name} after step {step}; kept in "
                                  f"{output}: monitoring/ (so8t report {output}); {kept} (--resume latest continues "
                                  f"from checkpoint-{step})")
    assert stopped["complete"] and stopped["state"]["global_step"] == step  # the step in progress finished
    assert stopped["steps recorded"] == list(range(1, step + 1))  # the monitor's files were finished
    assert not stopped["lock left"] and not stopped["published"]
    assert run["resumed"] == 0


@pytest.mark.parametrize("fixture", [fixture for fixture, _ in STOPPED], ids=["SIGTERM", "SIGINT while ignored"])
def test_resuming_after_a_signal_gives_the_uninterrupted_runs_adapter(fixture, straight_run, request):
    run = request.getfixturevalue(fixture)
    assert_same_adapter(straight_run, run["output"])
    _, samples, _ = read_metrics(run["output"] / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in samples] == list(range(1, STEPS + 1))


def test_the_resumed_monitoring_series_has_every_step_once(straight_run, killed_and_resumed):
    resumed, *_ = killed_and_resumed
    _, samples, _ = read_metrics(resumed / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in samples] == list(range(1, STEPS + 1))
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
