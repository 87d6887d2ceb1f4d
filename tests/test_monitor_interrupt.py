"""Ctrl-C during ``so8t train``: no traceback and no monitor error, one closing line that says where what
was kept is, status 130, and the monitoring recorded so far is finished and readable by ``so8t report``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_helpers import report

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_ctrl_c_ends_with_one_line_saying_what_was_kept(tmp_path, capsys):
    output = tmp_path / "run"
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "so8t", "train", "--max-steps", "100000", "--monitor-interval", "1",
         "--output-dir", str(output)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A shell that started pytest in the background may have left SIGINT ignored: Ctrl-C's default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            metrics = list(tmp_path.glob("*/monitoring/metrics.jsonl")) + list(tmp_path.glob(".*/monitoring/metrics.jsonl"))
            if metrics and metrics[0].read_text().count('"type":"sample"') >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "so8t monitor" not in stderr  # e.g. no error about a file that vanished under it
    closing = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("so8t train")]
    assert closing == [f"so8t train: interrupted; kept in {output}: monitoring/ (so8t report {output}); "
                       "no checkpoint yet (every 500 steps, --save-steps)"], stderr[-2000:]
    assert report([str(output)]) == 0
    assert "latest sample: step" in capsys.readouterr().out
