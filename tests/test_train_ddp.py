"""``so8t train`` as two torchrun processes on CPU (gloo): both ranks end with identical gates; a
checkpoint is marked complete only once every rank's files are in it; a SIGTERM to one rank stops both
after the same step, with a checkpoint of it; when rank 0 cannot publish the final files every rank says
so and ends, none waits."""

import contextlib
import json
import os
import re
import signal
import sys
import textwrap
import time

import torch
from child_processes import run, started

from so8t.training.checkpoints import CHECKPOINT_FILE

WORKER = textwrap.dedent("""
    import os
    import sys

    import torch
    from transformers import TrainerCallback

    from so8t import find_so8t_handle
    from so8t.training.distributed import end_process_group
    from so8t.training.finetune import finetune
    from so8t.training.options import TrainOptions


    class SaveGates(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            handle = find_so8t_handle(model)
            gates = {"theta": handle.theta.detach(), "alpha": handle.alpha.detach(), "world_size": args.world_size}
            torch.save(gates, f"{sys.argv[2]}/gates-{args.process_index}.pt")


    finetune(TrainOptions(model="demo", output_dir=sys.argv[1], max_steps=6, warmup_steps=2, batch_size=4, max_length=64,
                          extra_callbacks=[SaveGates()]))
    end_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


def test_two_process_training_keeps_the_gates_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    output, gates = tmp_path / "out", tmp_path / "gates"
    gates.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(output), str(gates)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    result = run(command, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = (torch.load(gates / f"gates-{rank}.pt") for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    # The ranks saw different batches: only the all-reduced gradients keep the gates equal.
    assert torch.equal(rank0["theta"], rank1["theta"]) and torch.equal(rank0["alpha"], rank1["alpha"])
    assert rank0["theta"].abs().sum() > 0
    assert not torch.allclose(rank0["alpha"], torch.tensor(-2.1972), atol=1e-4)  # trained after the 2 warmup steps
    assert result.stdout.count("outputs in") == 1  # only rank 0 writes and reports
    assert (output / "so8t" / "so8t_adapter.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gates", "out", "worker.py"]


# Rank 1 writes its RNG state (rng_state_1.pth, its only file in a DDP checkpoint) 2 s late; rank 0 logs
# which files the checkpoint holds when it writes the marker.
LATE_RANK_1 = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path

    from transformers import Trainer

    from so8t.commands.main import main
    from so8t.training import checkpoints

    rank = int(os.environ["RANK"])
    Path(os.environ["PIDS"], f"rank-{rank}").write_text(str(os.getpid()))
    save_rng_state, write_synced = Trainer._save_rng_state, checkpoints.write_synced

    def late_on_rank_1(self, output_dir):
        if rank == 1:
            time.sleep(2)
        save_rng_state(self, output_dir)

    def log_what_the_marker_saw(path, text):
        if path.name == checkpoints.CHECKPOINT_FILE:
            with open(os.environ["MARKERS"], "a") as log:
                log.write(json.dumps({"checkpoint": path.parent.name,
                                      "files": sorted(p.name for p in path.parent.iterdir())}) + "\\n")
        write_synced(path, text)

    Trainer._save_rng_state, checkpoints.write_synced = late_on_rank_1, log_what_the_marker_saw
    status = main(["train", *sys.argv[1:]])
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(status)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")
RUN = ["--model", "demo", "--save-steps", "2", "--save-total-limit", "0", "--warmup-steps", "1", "--batch-size", "4",
       "--max-length", "64",
       "--no-monitor-plots"]


@contextlib.contextmanager
def torchrun(script: str, argv: list[str], directory):
    """Two ranks; output in files; the launcher and both ranks (each in a session of its own) killed at the end."""
    (directory / "worker.py").write_text(script)
    (directory / "pids").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIDS": str(directory / "pids"), "MARKERS": str(directory / "markers")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(directory / "worker.py"), *argv]
    with started(command, directory, env=env) as launcher:
        yield launcher.process


def markers(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "markers").read_text().splitlines()]


def test_a_checkpoint_is_marked_complete_only_after_every_ranks_files(tmp_path):
    output = tmp_path / "out"
    with torchrun(LATE_RANK_1, [*RUN, "--max-steps", "4", "--output-dir", str(output)], tmp_path) as launcher:
        assert launcher.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    seen = markers(tmp_path)
    assert [entry["checkpoint"] for entry in seen] == ["checkpoint-2", "checkpoint-4"]
    for entry in seen:
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(entry["files"]), entry


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_with_its_checkpoint(tmp_path):
    output = tmp_path / "out"
    with torchrun(LATE_RANK_1, [*RUN, "--max-steps", "300", "--output-dir", str(output)], tmp_path) as launcher:
        deadline = time.monotonic() + 240
        while not (output / "checkpoint-2" / CHECKPOINT_FILE).is_file():
            assert launcher.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-2 in 240 s"
            time.sleep(0.05)
        os.kill(int((tmp_path / "pids" / "rank-1").read_text()), signal.SIGTERM)
        assert launcher.wait(timeout=120) != 0  # torchrun reports its ranks' exit status 143 as a failure
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr.split("elastic/multiprocessing")[0], stderr[-3000:]  # torchrun's own follows
    steps = re.findall(r"so8t train: stopped by SIGTERM after step (\d+); ", stderr)
    assert len(steps) == 2 and steps[0] == steps[1], stderr[-3000:]  # rank 0 learnt of rank 1's signal
    checkpoint = output / f"checkpoint-{steps[0]}"
    assert (checkpoint / CHECKPOINT_FILE).is_file() and (checkpoint / "rng_state_1.pth").is_file()
    assert markers(tmp_path)[-1]["checkpoint"] == checkpoint.name
    assert not (output / ".so8t-train.lock").exists()


# The final files cannot be written on rank 0 (a full disk); each rank records the train command's status.
FULL_DISK_ON_RANK_0 = textwrap.dedent("""
    import errno, os, sys
    from pathlib import Path

    from so8t.commands.main import main
    from so8t.training import runner

    def full_disk(output_dir, write_final):
        raise OSError(errno.ENOSPC, "No space left on device", str(output_dir))

    rank = os.environ["RANK"]
    if rank == "0":
        runner.publish = full_disk
    status = main(["train", *sys.argv[1:]])
    Path(os.environ["PIDS"], f"status-{rank}").write_text(str(status))
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # past the interpreter's teardown, where gloo now and then aborts a rank (SIGABRT)
""")


def test_when_rank_0_cannot_publish_every_rank_ends_with_one_line(tmp_path):
    output = tmp_path / "out"
    with torchrun(FULL_DISK_ON_RANK_0, [*RUN, "--max-steps", "2", "--output-dir", str(output)], tmp_path) as launcher:
        assert launcher.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stderr = (tmp_path / "stderr.txt").read_text()
    assert [(tmp_path / "pids" / f"status-{rank}").read_text() for rank in (0, 1)] == ["2", "2"], stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("so8t train: error: ")]
    assert len(errors) == 2, stderr[-3000:]
    assert any("cannot write the final files" in line and "No space left on device" in line for line in errors)
    assert any("rank 0 could not publish the final files" in line for line in errors)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (output / "so8t").exists() and not (output / ".so8t-train.lock").exists()
