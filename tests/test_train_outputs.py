"""The output directory of ``so8t train`` when things go wrong: a kill in the middle of publishing, a full
disk, a directory that cannot be written, Ctrl-C and SIGTERM (also twice), and training that diverges to
NaN. Each ends with one line and exit status 2 (130 for SIGINT, 143 for SIGTERM), the directory unlocked,
and the previous output intact or the new one complete."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import train as main
from safetensors.torch import load_file
from child_processes import so8t_train

from so8t.training.checkpoints import CHECKPOINT_FILE
from so8t.training.outputs import LOCK_FILE, PUBLISH_DIR, claimed_output_dir, publish

REPO_ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--model", "demo", "--max-steps", "4", "--batch-size", "4", "--max-length", "64", "--warmup-steps", "2", "--no-monitor-plots"]
PREVIOUS = {"adapter_config.json": '{"previous": true}', "so8t/so8t_adapter.json": '{"previous": true}',
            "precious.txt": "keep me"}


def previous_output(directory: Path) -> Path:
    for name, text in PREVIOUS.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def assert_previous_intact(directory: Path) -> None:
    for name, text in PREVIOUS.items():
        assert (directory / name).read_text() == text, name
    assert not (directory / PUBLISH_DIR).exists() and not (directory / LOCK_FILE).exists()


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("so8t train: error: ") and "Traceback" not in stderr, stderr
    return errors[0]


KILLED_WHILE_PUBLISHING = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from so8t.training import outputs

    def write(directory):
        (directory / "adapter_config.json").write_text('{"new": true}')
        (directory / "so8t").mkdir()
        (directory / "so8t" / "so8t_adapter.json").write_text('{"new": true}')

    renames = 0
    original = Path.rename
    def rename_then_die(self, target):
        global renames
        result = original(self, target)
        renames += 1
        if renames == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Path.rename = rename_then_die
    outputs.publish(Path(sys.argv[1]), write)
""")


@pytest.mark.parametrize("renames", [1, 2, 3])
def test_a_kill_between_the_renames_of_a_publish_is_finished_by_the_next_run(tmp_path, renames):
    output = previous_output(tmp_path / "run")
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.run([sys.executable, "-c", KILLED_WHILE_PUBLISHING, str(output), str(renames)],
                             env=environment, capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert (output / PUBLISH_DIR).is_dir()  # cut short: some files old, some new, none half-written
    with claimed_output_dir(output, overwrite=False, resume=True):
        pass  # what every run into the directory does first
    assert json.loads((output / "adapter_config.json").read_text()) == {"new": True}
    assert json.loads((output / "so8t" / "so8t_adapter.json").read_text()) == {"new": True}
    assert sorted(path.name for path in output.iterdir()) == ["adapter_config.json", "so8t"]


def test_a_publish_that_fails_while_writing_leaves_the_previous_files(tmp_path):
    output = previous_output(tmp_path / "run")

    def write_until_the_disk_is_full(directory):
        (directory / "adapter_config.json").write_text('{"new": true}')
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "adapter_model.safetensors"))

    with pytest.raises(OSError):
        publish(output, write_until_the_disk_is_full)
    assert_previous_intact(output)


def test_disk_full_while_publishing_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    import so8t.training.finetune

    output = previous_output(tmp_path / "run")

    def save_until_the_disk_is_full(training, directory, trainable):
        training.model.save_pretrained(directory)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "so8t" / "so8t_adapter.safetensors"))

    monkeypatch.setattr(so8t.training.finetune, "save_outputs", save_until_the_disk_is_full)
    assert main([*SHORT, "--save-steps", "2", "--output-dir", str(output), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "the previous final files are unchanged" in line
    assert "checkpoints kept" in line and "checkpoint-4" in line
    assert_previous_intact(output)
    assert (output / "checkpoint-4" / CHECKPOINT_FILE).is_file() and (output / "monitoring" / "metrics.jsonl").is_file()


def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    import so8t.training.checkpoints

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "so8t_adapter.safetensors")

    monkeypatch.setattr(so8t.training.checkpoints, "save_so8t_adapter", full)
    output = previous_output(tmp_path / "run")
    assert main([*SHORT, "--save-steps", "2", "--output-dir", str(output), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training stopped, cannot write: so8t_adapter.safetensors: No space left on device" in line
    assert_previous_intact(output)


@pytest.mark.parametrize("error", [FileNotFoundError(errno.ENOENT, "No such file or directory", "tokenizer.json"),
                                   ConnectionError("Connection refused")], ids=["missing file", "connection"])
def test_an_os_error_that_is_no_write_failure_keeps_its_own_traceback(error, tmp_path, monkeypatch, capsys):
    import so8t.training.checkpoints

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(so8t.training.checkpoints, "save_so8t_adapter", fail)
    with pytest.raises(type(error)):
        main([*SHORT, "--save-steps", "2", "--output-dir", str(tmp_path / "run")])
    assert "cannot write" not in capsys.readouterr().err
    # The failed run's monitoring is finished when the error leaves so8t, not at the interpreter's exit.
    summary = json.loads((tmp_path / "run" / "monitoring" / "summary.json").read_text())
    assert summary["samples_recorded"] >= 1, summary


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for a run's monitoring, not for its first checkpoint (1.4 MB of optimizer state)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the disk-full tests above "
                    "inject the error instead")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_is_one_line_and_keeps_the_previous_output(small_disk, capsys):
    output = previous_output(small_disk / "run")
    assert main([*SHORT, "--save-steps", "2", "--output-dir", str(output), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)  # torch.save reports it as a RuntimeError
    assert f"training stopped, cannot write: no space left on the device of {output}" in line
    assert_previous_intact(output)


def test_an_output_dir_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main([*SHORT, "--output-dir", str(tmp_path / "file" / "run")]) == 2
    assert "cannot write into --output-dir" in one_error_line(capsys.readouterr().err)


def make_read_only(directory: Path) -> None:
    """chmod works for a normal user; root needs the immutable attribute (ext2/3/4 and CAP_LINUX_IMMUTABLE)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return
    result = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"running as root, and chattr +i failed ({result.stderr.strip()}): no way to make a "
                    "directory read-only for root here")


def make_writable(directory: Path) -> None:
    if os.geteuid() != 0:
        directory.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_read_only_output_dir_is_one_line_and_keeps_the_previous_output(tmp_path, capsys):
    output = previous_output(tmp_path / "run")
    make_read_only(output)
    try:
        assert main([*SHORT, "--output-dir", str(output), "--overwrite"]) == 2
    finally:
        make_writable(output)
    assert "cannot write into --output-dir" in one_error_line(capsys.readouterr().err)
    assert_previous_intact(output)


@pytest.fixture
def read_only_parent(tmp_path):
    """A directory nobody can create anything in: for a normal user one with mode 0o500; root ignores
    modes, so for root a read-only tmpfs mounted there."""
    parent = tmp_path / "read-only"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o500)
        yield parent
        parent.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(parent)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:  # root without CAP_SYS_ADMIN: sysfs refuses root too (EPERM)
        yield Path("/sys")
        return
    try:
        yield parent
    finally:
        subprocess.run(["umount", str(parent)], check=True)


def assert_cannot_be_created(output: Path, capsys) -> None:
    assert main([*SHORT, "--output-dir", str(output)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"so8t train: error: cannot write into --output-dir {output}: "), line
    assert not output.exists()


def test_a_new_output_dir_in_a_read_only_directory_is_one_line_and_writes_nothing(read_only_parent, capsys):
    assert_cannot_be_created(read_only_parent / "run", capsys)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="no sysfs mounted at /sys")
def test_a_new_output_dir_the_filesystem_refuses_even_to_root_is_one_line(capsys):
    # sysfs refuses mkdir with EPERM although root's permission check passes: the Trainer's makedirs meets it.
    assert_cannot_be_created(Path("/sys") / "so8t-test-run", capsys)


LONG = [*SHORT, "--max-steps", "100000", "--save-total-limit", "0"]


def closing_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return stderr.rstrip().splitlines()[-1]


def test_ctrl_c_keeps_the_checkpoints_and_monitoring_and_releases_the_directory(tmp_path):
    output = tmp_path / "run"
    with so8t_train([*LONG, "--save-steps", "3", "--output-dir", str(output)], tmp_path / "logs") as child:
        child.wait_for(output / "checkpoint-3" / CHECKPOINT_FILE)
        child.send(signal.SIGINT)
        assert child.wait(120) == 130, child.stderr[-3000:]
        line = closing_line(child.stderr)
    assert line.startswith("so8t train: stopped by SIGINT after step ") and f"; kept in {output}: monitoring/ " in line
    assert "checkpoint-3" in line and "--resume latest" in line
    assert (output / "checkpoint-3" / CHECKPOINT_FILE).is_file()
    assert (output / "monitoring" / "metrics.jsonl").is_file()
    assert not (output / LOCK_FILE).exists() and not (output / "adapter_config.json").exists()


# The first SIGTERM comes at the end of step 3 (the process sends it itself, so the step is known); the
# checkpoint it asks for then waits in the so8t part of its save (after the Trainer's files) until a second
# signal interrupts it.
SLOW_SAVE_AFTER_SIGTERM = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from so8t.commands.main import main
    from so8t.training.checkpoints import CheckpointCallback
    from so8t.training.stopping import StopOnSignal

    step_end, complete = StopOnSignal.on_step_end, CheckpointCallback.on_save

    def sigterm_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_end(self, args, state, control, **kwargs)

    def slow_on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            Path(os.environ["SAVING"]).write_text("checkpoint-3")
            time.sleep(600)
        return complete(self, args, state, control, **kwargs)

    StopOnSignal.on_step_end, CheckpointCallback.on_save = sigterm_at_step_3, slow_on_save
    sys.exit(main(sys.argv[1:]))
""")


def test_a_second_signal_while_the_checkpoint_is_saved_stops_at_once_and_releases_the_directory(tmp_path, monkeypatch):
    output, saving = tmp_path / "run", tmp_path / "saving"
    monkeypatch.setenv("SAVING", str(saving))
    with so8t_train([*LONG, "--save-steps", "2", "--output-dir", str(output)], tmp_path / "logs",
                    script=SLOW_SAVE_AFTER_SIGTERM) as child:
        child.wait_for(saving)
        sent = time.monotonic()
        child.send(signal.SIGTERM)
        assert child.wait(60) == 143, child.stderr[-3000:]
        assert time.monotonic() - sent < 30  # not the 600 s the save would take
        line = closing_line(child.stderr)
    assert line == (f"so8t train: stopped at once by a second SIGTERM; kept in {output}: monitoring/ (so8t report "
                    f"{output}); checkpoint-2 (--resume latest continues from checkpoint-2)")
    assert (output / "checkpoint-3").is_dir() and not (output / "checkpoint-3" / CHECKPOINT_FILE).exists()
    assert not (output / LOCK_FILE).exists()


def test_keep_sigint_ignored_keeps_training_through_sigint_and_sigterm_still_stops(tmp_path):
    output = tmp_path / "run"
    with so8t_train([*LONG, "--save-steps", "3", "--keep-sigint-ignored", "--output-dir", str(output)],
                    tmp_path / "logs", sigint_ignored=True) as child:
        child.wait_for(output / "checkpoint-3" / CHECKPOINT_FILE)
        child.send(signal.SIGINT)
        child.wait_for(output / "checkpoint-9" / CHECKPOINT_FILE)  # two checkpoints later, still training
        child.send(signal.SIGTERM)
        assert child.wait(120) == 143, child.stderr[-3000:]
        line = closing_line(child.stderr)
    assert line.startswith("so8t train: stopped by SIGTERM after step ")


@pytest.mark.parametrize("task", ["classify", "generate"])
def test_training_that_diverges_publishes_nothing(task, tmp_path, capsys):
    output = tmp_path / "run"
    code = main(["--model", "demo", "--task", task, "--learning-rate", "1e6", "--max-steps", "6", "--save-steps", "1",
                 "--save-total-limit", "0", "--batch-size", "4", "--max-length", "64", "--no-monitor-plots",
                 "--output-dir", str(output)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training diverged" in line and "nothing published" in line
    names = {path.name for path in output.iterdir()}
    assert not names & {"adapter_model.safetensors", "model.safetensors", "so8t", "adapter_config.json"}, names
    # The checkpoints the message names are the ones kept, each with finite weights.
    kept = [path for path in output.iterdir() if path.name.startswith("checkpoint-")]
    named = line.partition("checkpoints with finite weights kept in ")[2]
    assert sorted(named.split(": ")[1].split(" (")[0].split(", ") if named else []) == sorted(p.name for p in kept)
    for checkpoint in kept:
        weights = checkpoint / ("model.safetensors" if task == "classify" else "adapter_model.safetensors")
        assert all(tensor.isfinite().all() for tensor in load_file(weights).values())


def test_training_from_another_thread_leaves_the_signal_handlers_alone():
    from so8t.training.stopping import StopOnSignal

    before, errors = signal.getsignal(signal.SIGTERM), []

    def train_in_a_thread():
        try:
            with StopOnSignal().listening():
                errors.append(signal.getsignal(signal.SIGTERM) is not before)
        except ValueError as error:  # "signal only works in main thread of the main interpreter"
            errors.append(error)

    thread = threading.Thread(target=train_in_a_thread)
    thread.start()
    thread.join()
    assert errors == [False]
