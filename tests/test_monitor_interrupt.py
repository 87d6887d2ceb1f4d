"""Ctrl-C during ``so8t train``: no traceback and no monitor error, one closing line that says where what
was kept is, status 130, and the monitoring recorded so far is finished and readable by ``so8t report``."""

import re
import signal
import time

from cli_helpers import report
from child_processes import so8t_train


def test_ctrl_c_ends_with_one_line_saying_what_was_kept(tmp_path, capsys):
    output = tmp_path / "run"
    metrics = output / "monitoring" / "metrics.jsonl"
    with so8t_train(["--model", "demo", "--max-steps", "100000", "--monitor-interval", "1", "--output-dir", str(output)],
                    tmp_path / "logs") as child:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().count('"type":"sample"') >= 3):
            assert child.process.poll() is None, child.stderr[-3000:]
            assert time.monotonic() < deadline, "no 3 monitor samples in 240 s"
            time.sleep(0.2)
        child.send(signal.SIGINT)
        assert child.wait(120) == 130, child.stderr[-3000:]
        stderr = child.stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "so8t monitor" not in stderr  # e.g. no error about a file that vanished under it
    closing = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("so8t train")]
    assert len(closing) == 1, stderr[-2000:]
    step = re.fullmatch(r"so8t train: stopped by SIGINT after step (\d+); .*", closing[0]).group(1)
    # --save-steps is 500: the checkpoint is the one the signal asked for.
    assert closing[0] == (f"so8t train: stopped by SIGINT after step {step}; kept in {output}: monitoring/ (so8t "
                          f"report {output}); checkpoint-{step} (--resume latest continues from checkpoint-{step})")
    assert report([str(output)]) == 0
    assert "latest sample: step" in capsys.readouterr().out
