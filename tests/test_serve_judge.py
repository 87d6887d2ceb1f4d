"""The safety judge trained by ``so8t train --task classify`` on a slice of the bundled data, then served: each label
becomes its outcome over HTTP, in the audit row and in /metrics; an unconfident judge escalates."""

import json
from collections import Counter

import httpx
import numpy as np
import pytest
from monitor_helpers import read_metrics
from serve_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    one_torch_thread,
    open_audit,
    request_counts,
    running_server,
    verify,
)
from test_judge import classifier

from so8t import attach_so8t
from so8t.audit.log import read_rows
from so8t.commands.main import main
from so8t.judge.data import bundled_safety_path, read_labelled_jsonl
from so8t.judge.judge import ALLOW, DENY, ESCALATE, LABELS, SafetyJudge
from so8t.models.demo import build_demo_tokenizer
from so8t.serve.app import create_app
from so8t.serve.engines.hf import HFEngine

TRAIN_STEPS = 150  # 96% of ROWS_PER_LABEL × 3 bundled rows at 150 steps, ~1 s of CPU per 4 steps
# The 1M-parameter demo model memorises a slice of the bundled data, not all of it (65% of it after 500 steps):
# these tests are about serving a judge's verdicts, not about what the judge knows.
ROWS_PER_LABEL = 15


@pytest.fixture(scope="module")
def examples():
    """The first ROWS_PER_LABEL bundled training rows of each label."""
    seen = Counter()
    chosen = []
    for row in read_labelled_jsonl(bundled_safety_path()):
        seen[row.label] += 1
        if seen[row.label] <= ROWS_PER_LABEL:
            chosen.append(row)
    return chosen


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, examples):
    directory = tmp_path_factory.mktemp("judge")
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps({"text": row.text, "label": LABELS[row.label]}) + "\n" for row in examples))
    output = directory / "run"
    status = main(["train", "--model", "demo", "--task", "classify", "--data", str(data), "--output-dir", str(output),
                   "--batch-size", "8", "--max-length", "256",
                   "--max-steps", str(TRAIN_STEPS), "--warmup-steps", "20"])
    assert status == 0
    return output


def test_classifier_training_writes_a_judge_with_the_label_vocabulary(judge_dir):
    config = json.loads((judge_dir / "config.json").read_text())
    assert config["id2label"] == {"0": ALLOW, "1": ESCALATE, "2": DENY}
    assert config["label2id"] == {ALLOW: 0, ESCALATE: 1, DENY: 2}
    assert (judge_dir / "so8t" / "so8t_adapter.safetensors").is_file()
    state = json.loads((judge_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == TRAIN_STEPS and losses[-1] < 0.5 * losses[0]
    # The monitor recorded the class logits (3 per example) and the gates.
    _, samples, _ = read_metrics(judge_dir / "monitoring" / "metrics.jsonl")
    assert samples and all(np.isfinite(sample["logit_std"]) for sample in samples)
    assert samples[-1]["gate"] == pytest.approx([0.1] * 4, abs=0.02)


def test_the_trained_judge_learnt_its_data(judge_dir, examples):
    judge = SafetyJudge.load(judge_dir)
    verdicts = [judge.judge(example.text) for example in examples]
    accuracy = np.mean([verdict.predicted == LABELS[example.label] for verdict, example in zip(verdicts, examples)])
    assert accuracy >= 0.9
    assert {verdict.label for verdict in verdicts} == set(LABELS)


def test_each_label_is_its_outcome_over_http_in_the_audit_log_and_in_metrics(judge_dir, examples, tmp_path):
    judge = SafetyJudge.load(judge_dir)
    # One training prompt per label that the judge gives confidently, chosen before serving.
    chosen = {}
    for example in examples:
        verdict = judge.judge(example.text)
        if verdict.reason == "model" and verdict.label == LABELS[example.label]:
            chosen.setdefault(verdict.label, (example.text, verdict))
    assert set(chosen) == set(LABELS)

    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(HFEngine.load(), audit, judge)) as url:
        assert httpx.get(f"{url}/health").json()["safety_model"] is True
        bodies = {}
        for label, (prompt, verdict) in chosen.items():
            response = httpx.post(f"{url}/think", json={"prompt": prompt, "max_new_tokens": 8}, timeout=120)
            assert response.status_code == 200
            body = bodies[label] = response.json()
            assert body["safety"] == {"label": label, "confidence": pytest.approx(verdict.confidence),
                                      "predicted": label, "reason": "model"}
        metrics = httpx.get(f"{url}/metrics").text
    audit.close()

    assert bodies[ALLOW]["outcome"] == "answered" and isinstance(bodies[ALLOW]["answer"], str)
    assert bodies[ALLOW]["monitor"]["generated_tokens"] >= 1
    for label, outcome in ((ESCALATE, "escalated"), (DENY, "denied")):
        body = bodies[label]
        assert body["outcome"] == outcome
        assert body["answer"] is None and body["thinking_sha256"] is None and "monitor" not in body

    rows = {row.request_id: row for row in read_rows(tmp_path / "audit.db")}
    assert verify(tmp_path / "audit.db", audit).ok and len(rows) == 3
    for label, body in bodies.items():
        row = rows[body["request_id"]]
        assert (row.outcome, row.status, row.safety_label) == (body["outcome"], 200, label)
        assert row.safety_confidence == pytest.approx(body["safety"]["confidence"])
        assert row.prompt_hmac == audit.digest(chosen[label][0])
        answered = label == ALLOW
        assert (row.answer_hmac == audit.digest(body["answer"])) if answered else row.answer_hmac is None
    assert request_counts(metrics) == {(ALLOW, "answered", "200"): 1, (ESCALATE, "escalated", "200"): 1,
                                       (DENY, "denied", "200"): 1}


def test_an_unconfident_judge_escalates_over_http(tmp_path):
    tokenizer = build_demo_tokenizer()
    model = classifier(tokenizer, seed=1)  # untrained: probabilities near 1/3 each
    attach_so8t(model)
    judge = SafetyJudge(model, tokenizer, threshold=0.6)
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(HFEngine.load(), audit, judge)) as url:
        response = httpx.post(f"{url}/think", json={"prompt": "How do I bake sourdough bread?"}, timeout=120)
    audit.close()
    body = response.json()
    assert response.status_code == 200 and body["outcome"] == "escalated" and body["answer"] is None
    assert body["safety"]["label"] == ESCALATE and body["safety"]["reason"] == "low_confidence"
    assert body["safety"]["confidence"] < 0.6
    [row] = read_rows(tmp_path / "audit.db")
    assert (row.outcome, row.safety_label) == ("escalated", ESCALATE)
    assert row.safety_confidence == pytest.approx(body["safety"]["confidence"])


def test_the_threshold_is_a_serve_option(judge_dir, capsys):
    assert main(["serve", "--safety-model", str(judge_dir), "--safety-threshold", "1.5"]) == 2
    assert "--safety-threshold" in capsys.readouterr().err
    assert SafetyJudge.load(judge_dir, threshold=0.9).threshold == 0.9
