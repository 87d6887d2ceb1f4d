"""The demo judge as ``so8t train --task classify`` builds it: accuracy on held-out rows it never trained
on is measured, printed and stored, and it is the accuracy of the judge as served; its confidence is
calibrated on them (the temperature is stored next to the judge and applied when it is loaded).

The 1M-parameter demo model reads bytes, not meaning: on the bundled held-out rows it is near the
majority-class rate (64% after the default 150 steps, 52% of the rows being ALLOW). What the bundled data teaches a real model is
measured by benchmarks/judge_eval.py. The data's own invariants are in test_judge_data.py."""

import json
import os
import subprocess
import sys

import pytest
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)

from so8t.judge.calibration import CALIBRATION_FILE
from so8t.judge.data import bundled_heldout_path, read_labelled_jsonl
from so8t.judge.judge import LABELS, SafetyJudge


@pytest.fixture(scope="module")
def demo_judge(tmp_path_factory):
    """``so8t train --task classify`` with its defaults, as a user runs it."""
    output = tmp_path_factory.mktemp("judge") / "run"
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "so8t", "train", "--model", "demo", "--task", "classify", "--output-dir", str(output),
                             "--no-monitor"], capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_held_out_accuracy_is_measured_printed_and_stored(demo_judge):
    output, printed = demo_judge
    held_out = read_labelled_jsonl(bundled_heldout_path())
    calibration = json.loads((output / CALIBRATION_FILE).read_text())
    assert calibration["held_out_rows"] == len(held_out)
    assert f"held-out accuracy {calibration['held_out_accuracy']:.0%} on {len(held_out)} rows" in printed
    # The stored figure is the served judge's: recount it through SafetyJudge, one prompt at a time.
    judge = SafetyJudge.load(output, threshold=0.0)
    correct = sum(judge.judge(example.text).predicted == LABELS[example.label] for example in held_out)
    assert correct / len(held_out) == pytest.approx(calibration["held_out_accuracy"], abs=1.5 / len(held_out))


def test_the_stored_temperature_is_fitted_and_applied(demo_judge):
    output, _ = demo_judge
    calibration = json.loads((output / CALIBRATION_FILE).read_text())
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"]
    assert SafetyJudge.load(output).temperature == calibration["temperature"]
