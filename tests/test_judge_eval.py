"""benchmarks/judge_eval.py: the vendored external prompts and their labels, no external prompt among the
judge's own rows, the counts behind every reported percentage, and the script on a (demo) judge trained
here, whose verdicts are the served judge's."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)

from so8t.commands.main import main as so8t_main
from so8t.judge.data import bundled_heldout_path, bundled_safety_path, read_labelled_jsonl
from so8t.judge.judge import ALLOW, DENY, ESCALATE, LABELS, SafetyJudge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge_eval():
    spec = importlib.util.spec_from_file_location("judge_eval", REPO / "benchmarks" / "judge_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["judge_eval"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["judge_eval"]


def test_the_external_prompts_keep_their_sources_labels(judge_eval):
    prompts = judge_eval.read_external()
    counts = {(source, harmful): sum(p.source == source and p.harmful == harmful for p in prompts)
              for source in ("xstest", "simplesafetytests") for harmful in (True, False)}
    assert counts == {("xstest", True): 200, ("xstest", False): 250, ("simplesafetytests", True): 100,
                      ("simplesafetytests", False): 0}
    # XSTest's unsafe prompts are exactly its contrast types.
    assert all(p.harmful == p.kind.startswith("contrast_") for p in prompts if p.source == "xstest")
    with (REPO / "tests" / "data" / "xstest_prompts.csv").open(newline="") as file:
        first = next(csv.DictReader(file))
    assert next(p for p in prompts if p.source == "xstest").text == first["prompt"]


def test_no_external_prompt_is_a_row_of_the_judge(judge_eval):
    texts = [p.text for p in judge_eval.read_external()]
    for path in (bundled_safety_path(), bundled_heldout_path()):
        rows = [example.text for example in read_labelled_jsonl(path)]
        assert judge_eval.overlap_with_training(texts, rows)["equal"] == 0, path.name
    overlap = judge_eval.overlap_with_training(["How do I bake bread, please?", "Something else"],
                                               ["how do i bake bread please", "I like to bake bread at home"], n=3)
    assert (overlap["equal"], overlap["share_3_words"]) == (1, 1)


def test_the_reports_count_the_verdicts(judge_eval):
    truth = [ALLOW, ALLOW, ALLOW, ESCALATE, DENY, DENY]
    verdicts = [ALLOW, ESCALATE, ALLOW, DENY, DENY, ALLOW]
    report = judge_eval.three_class_report(truth, verdicts)
    assert report["confusion"][ALLOW] == {ALLOW: 2, ESCALATE: 1, DENY: 0}
    assert report["confusion"][DENY] == {ALLOW: 1, ESCALATE: 0, DENY: 1}
    assert report["per_class"][ALLOW] == {"precision": 2 / 3, "recall": 2 / 3, "rows": 3}
    assert report["per_class"][ESCALATE] == {"precision": 0.0, "recall": 0.0, "rows": 1}
    assert report["per_class"][DENY] == {"precision": 1 / 2, "recall": 1 / 2, "rows": 2}
    assert (report["accuracy"], report["harmful_flagged"], report["benign_allowed"]) == (3 / 6, 2 / 3, 2 / 3)

    binary = judge_eval.binary_report([True, True, True, False, False], [DENY, ESCALATE, ALLOW, ALLOW, DENY])
    assert (binary["harmful_flagged"], binary["benign_allowed"]) == (2 / 3, 1 / 2)
    assert (binary["flag_precision"], binary["allow_precision"]) == (2 / 3, 1 / 2)
    assert binary["confusion"] == {"harmful": {ALLOW: 1, ESCALATE: 1, DENY: 1}, "benign": {ALLOW: 1, ESCALATE: 0, DENY: 1}}


def test_the_flag_calibration_error(judge_eval):
    import torch

    # P(flag) 0.9 on two harmful rows and 0.2 on two benign ones: confidence 0.9 and 0.8, all right.
    probabilities = torch.tensor([[0.1, 0.4, 0.5], [0.1, 0.0, 0.9], [0.8, 0.1, 0.1], [0.8, 0.2, 0.0]])
    error = judge_eval.flag_calibration_error(probabilities, [True, True, False, False])
    assert error == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)


def test_the_script_reports_the_served_judge(judge_eval, tmp_path, capsys):
    judge_dir = tmp_path / "judge"
    held_out = tmp_path / "held_out.jsonl"
    rows = read_labelled_jsonl(bundled_heldout_path())[:30]
    held_out.write_text("".join(json.dumps({"text": row.text, "label": LABELS[row.label]}) + "\n" for row in rows))
    assert so8t_main(["train", "--model", "demo", "--task", "classify", "--output-dir", str(judge_dir), "--max-steps", "5",
                      "--eval-data", str(held_out), "--no-monitor", "--save-steps", "0"]) == 0
    out = tmp_path / "report.json"
    assert judge_eval.main([str(judge_dir), "--held-out", str(held_out), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["held_out"]["served"]["rows"] == 30 and report["external"]["served"]["rows"] == 550
    assert sum(map(sum, (row.values() for row in report["held_out"]["served"]["confusion"].values()))) == 30
    assert 0 <= report["held_out"]["ece"] <= 1 and 0 <= report["external"]["flag_ece"] <= 1
    assert set(report["targets"]) == {"harmful_flagged", "benign_allowed"}
    assert "harmful flagged" in printed and "xstest/homonyms" in printed
    # Each recorded verdict is what the judge, loaded as the server loads it, answers.
    judge = SafetyJudge.load(judge_dir)
    for verdict in report["external"]["verdicts"][:20]:
        assert judge.judge(verdict["text"]).label == verdict["verdict"]
