"""The demo judge as ``so8t train --task classify`` builds it: accuracy on held-out rows it never trained
on is measured and printed, its confidence is calibrated on them (the temperature is stored next to the
judge and applied when it is loaded), and plainly harmless everyday prompts are allowed."""

import json
import os
import subprocess
import sys

import pytest

from so8t.calibration import CALIBRATION_FILE
from so8t.classify import bundled_heldout_path, bundled_safety_path, read_labelled_jsonl
from so8t.judge import ALLOW, LABELS, SafetyJudge
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)

EVERYDAY = ("Write a haiku about autumn.", "Recommend a good book.")


@pytest.fixture(scope="module")
def demo_judge(tmp_path_factory):
    """``so8t train --task classify`` with its defaults, as a user runs it."""
    output = tmp_path_factory.mktemp("judge") / "run"
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "so8t", "train", "--task", "classify", "--output-dir", str(output),
                             "--no-monitor"], capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_held_out_rows_are_not_training_rows():
    training = {example.text for example in read_labelled_jsonl(bundled_safety_path())}
    held_out = read_labelled_jsonl(bundled_heldout_path())
    assert len(held_out) == 60 and not training & {example.text for example in held_out}
    assert {LABELS[example.label] for example in held_out} == set(LABELS)


def test_held_out_accuracy_is_measured_printed_and_stored(demo_judge):
    output, printed = demo_judge
    calibration = json.loads((output / CALIBRATION_FILE).read_text())
    assert calibration["held_out_rows"] == 60
    assert f"held-out accuracy {calibration['held_out_accuracy']:.0%} on 60 rows" in printed
    # The stored figure is the served judge's: recount it through SafetyJudge, one prompt at a time.
    judge = SafetyJudge.load(output, threshold=0.0)
    held_out = read_labelled_jsonl(bundled_heldout_path())
    correct = sum(judge.judge(example.text).predicted == LABELS[example.label] for example in held_out)
    assert correct / 60 == pytest.approx(calibration["held_out_accuracy"], abs=1.5 / 60)
    assert calibration["held_out_accuracy"] >= 0.8


def test_the_stored_temperature_is_fitted_and_applied(demo_judge):
    output, _ = demo_judge
    calibration = json.loads((output / CALIBRATION_FILE).read_text())
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"]
    assert SafetyJudge.load(output).temperature == calibration["temperature"]


def test_everyday_prompts_are_allowed(demo_judge):
    output, _ = demo_judge
    judge = SafetyJudge.load(output)
    for prompt in EVERYDAY:
        verdict = judge.judge(prompt)
        assert (verdict.label, verdict.reason) == (ALLOW, "model"), (prompt, verdict)
