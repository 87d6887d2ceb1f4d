"""so8t commands (and launchers: torchrun, accelerate, bash scripts) as separate processes, as a user, a
script or a cluster scheduler runs them, started so that a test leaves nothing running and nothing blocked.

A long-running child's stdout and stderr go to files (a pipe nobody reads fills up at 64 KiB and stops the
child); each child starts in a session of its own and, however the test ends (an assertion, a timeout,
Ctrl-C), is killed with every process it started: its process group and its descendants (torchrun starts
each rank in a session of its own, so killing the launcher's group alone would leave the ranks running).
The child's stdin is /dev/null and its SIGINT disposition is set explicitly, so a test behaves the same
whether pytest was started from a terminal or in the background by a script (which ignores SIGINT and may
have no stdin).
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to ``process``, its descendants and its process group (it leads one: every child here starts
    a session), then reaps it."""
    if process.poll() is None:  # its pid is still its own: its descendants can be found
        with contextlib.suppress(psutil.Error):
            for descendant in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    descendant.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group: what outlived the leader, too
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def run(command: list[str], timeout: float, input: str | None = None, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, but a timeout (or any
    exception, pytest-timeout's included) kills every process the command started, not only the first: a
    launcher's ranks or a script's commands would otherwise run on, holding ports, files and cores."""
    stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
    with subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **popen) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        finally:
            kill_tree(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


class ChildProcess:
    def __init__(self, process: subprocess.Popen, logs: Path):
        self.process = process
        self.logs = logs

    @property
    def stdout(self) -> str:
        return (self.logs / "stdout.txt").read_text(errors="replace")

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
            self._still_running(deadline, f"{path} did not appear in {seconds} s")

    def wait_for_stdout(self, pattern: str, seconds: float = 180) -> re.Match:
        """The first match of ``pattern`` (multiline) in what the process printed; fails at once if it ends first."""
        deadline = time.monotonic() + seconds
        while not (match := re.search(pattern, self.stdout, re.MULTILINE)):
            self._still_running(deadline, f"no {pattern!r} on stdout in {seconds} s")
        return match

    def _still_running(self, deadline: float, failure: str) -> None:
        assert self.process.poll() is None, f"exited with {self.process.returncode}: {self.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"{failure}; stderr: {self.stderr[-3000:]}"
        time.sleep(0.02)


@contextlib.contextmanager
def started(command: list[str], logs: Path, sigint_ignored: bool = False, **popen) -> Iterator[ChildProcess]:
    """``command`` running until the ``with`` block ends, its output in LOGS/stdout.txt and LOGS/stderr.txt,
    started with SIGINT ignored (a background job of a non-interactive shell: ``so8t train … &``) or at its
    default (a terminal)."""
    disposition = signal.SIG_IGN if sigint_ignored else signal.SIG_DFL
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout.txt", "w") as stdout, open(logs / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   start_new_session=True, **popen,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    try:
        yield ChildProcess(process, logs)
    finally:
        kill_tree(process)


def so8t_train(argv: list[str], logs: Path, sigint_ignored: bool = False,
               script: str | None = None) -> contextlib.AbstractContextManager[ChildProcess]:
    """``python -m so8t train ARGV`` (or ``python -c SCRIPT train ARGV``), offline, as ``started`` runs it."""
    program = ["-m", "so8t"] if script is None else ["-c", script]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return started([sys.executable, *program, "train", *argv], logs, sigint_ignored, env=environment)
