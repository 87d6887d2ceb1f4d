"""``so8t train`` as a separate process, as a user, a script or a cluster scheduler runs it.

Its stdout and stderr go to files (a pipe nobody reads fills up and stops the child), and the process
is killed when the ``with`` block ends, however it ends: a test that fails or times out leaves nothing
running. The launching shell's SIGINT disposition is set explicitly, so a test behaves the same
whether pytest was started from a terminal or in the background by a script (which ignores SIGINT).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainProcess:
    def __init__(self, process: subprocess.Popen, logs: Path):
        self.process = process
        self.logs = logs

    @property
    def stderr(self) -> str:
        return (self.logs / "stderr.txt").read_text(errors="replace")

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, seconds: float) -> int:
        return self.process.wait(timeout=seconds)

    def wait_for(self, path: Path, seconds: float = 180) -> None:
        """Until ``path`` exists; fails at once if the process ends first."""
        deadline = time.monotonic() + seconds
        while not path.exists():
            assert self.process.poll() is None, f"exited with {self.process.returncode}: {self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
            time.sleep(0.02)


@contextlib.contextmanager
def so8t_train(argv: list[str], logs: Path, sigint_ignored: bool = False,
               script: str | None = None) -> Iterator[TrainProcess]:
    """``python -m so8t train ARGV`` (or ``python -c SCRIPT train ARGV``), started with SIGINT ignored
    (a background job of a non-interactive shell: ``so8t train … &``) or at its default (a terminal)."""
    program = ["-m", "so8t"] if script is None else ["-c", script]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    disposition = signal.SIG_IGN if sigint_ignored else signal.SIG_DFL
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout.txt", "w") as stdout, open(logs / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, *program, "train", *argv], env=environment, stdout=stdout,
                                   stderr=stderr, preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    try:
        yield TrainProcess(process, logs)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
