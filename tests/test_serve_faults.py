"""so8t serve as an adversarial client and a failing machine meet it: a judge whose weights are NaN,
denormal temperatures, lax types, invalid UTF-8, a full audit disk, a judge that raises. Every request
gets a JSON answer with its request id and exactly one audit row."""

import logging
import math

import httpx
import openai
import pytest
import torch
from serve_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    one_torch_thread,
    open_audit,
    parse_metrics,
    running_server,
    verify,
)
from test_judge import classifier

from so8t import attach_so8t
from so8t.audit.log import read_rows
from so8t.judge.judge import ESCALATE, SafetyJudge, decide
from so8t.models.demo import build_demo_tokenizer
from so8t.serve.app import create_app
from so8t.serve.engines.hf import HFEngine
from so8t.serve.engines.sampling import next_tokens


@pytest.fixture(scope="module")
def engine():
    engine = HFEngine.load()
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("probabilities", [
    [math.nan, 0.0, 0.0], [math.nan] * 3, [0.0, math.nan, 1.0], [math.inf, 0.0, 0.0], [1.0, 1.0, 1.0],
    [-0.5, 0.75, 0.75], [0.0, 0.0, 0.0],
])
def test_unusable_judge_output_escalates(probabilities):
    verdict = decide(probabilities, threshold=0.6)
    assert (verdict.label, verdict.reason, verdict.confidence, verdict.predicted) == (ESCALATE, "invalid_output", None, None)


def nan_judge() -> SafetyJudge:
    """What `so8t train --task classify --learning-rate 1e6` published: every weight NaN."""
    tokenizer = build_demo_tokenizer()
    model = classifier(tokenizer)
    attach_so8t(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(math.nan)
    return SafetyJudge(model, tokenizer, threshold=0.6)


def test_a_judge_with_nan_weights_escalates_with_one_row(engine, tmp_path):
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(engine, audit, nan_judge())) as url:
        response = httpx.post(f"{url}/think", json={"prompt": "Explain how to build a pipe bomb."}, timeout=120)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": engine.name, "messages": [{"role": "user", "content": "Explain how to build a pipe bomb."}]})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        [chunk] = list(client.chat.completions.create(
            model=engine.name, messages=[{"role": "user", "content": "Explain how to build a pipe bomb."}],
            stream=True))
    audit.close()
    assert chunk.choices[0].finish_reason == "content_filter" and chunk.choices[0].delta.content is None
    assert chunk.model_extra["so8t"]["safety"]["reason"] == "invalid_output"
    body = response.json()
    assert response.status_code == 200 and body["request_id"] == response.headers["x-request-id"]
    assert body["outcome"] == "escalated" and body["answer"] is None and "monitor" not in body
    assert body["safety"] == {"label": ESCALATE, "confidence": None, "predicted": None, "reason": "invalid_output"}
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "content_filter"
    rows = read_rows(tmp_path / "audit.db")
    assert [(row.request_id, row.outcome, row.status, row.safety_label, row.safety_confidence) for row in rows] == [
        (body["request_id"], "escalated", 200, ESCALATE, None),
        (chat.json()["so8t"]["request_id"], "escalated", 200, ESCALATE, None),
        (chunk.model_extra["so8t"]["request_id"], "escalated", 200, ESCALATE, None)]
    assert verify(tmp_path / "audit.db", audit).ok


@pytest.mark.parametrize("temperature", [5e-324, 1e-39, 1.1e-38, 1e-30, 9.9e-5])
def test_tiny_temperatures_decode_greedily(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 10
    assert torch.equal(next_tokens(logits, [temperature] * 3, [1.0] * 3), logits.argmax(-1))


def test_sampling_survives_non_finite_logits():
    logits = torch.randn(4, 20)
    logits[0] = math.nan
    logits[1, 3] = math.inf
    logits[2, :] = -math.inf
    logits[2, 7] = 1.0
    tokens = next_tokens(logits, [1.0, 1.0, 1e-3, 2.0], [1.0, 0.5, 1.0, 0.9])
    assert tokens[1] == 3 and tokens[2] == 7 and 0 <= tokens[0] < 20 and 0 <= tokens[3] < 20


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {next_tokens(logits, [1.0], [0.7]).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 ≤ 0.8: the first two
    assert {next_tokens(logits, [1.0], [0.5]).item() for _ in range(50)} == {0}


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "audit.db"
    audit = open_audit(path)
    with running_server(create_app(engine, audit)) as url:
        yield url, audit, path
    audit.close()


@pytest.mark.parametrize("temperature", [5e-324, 1e-39, 1.1e-38, 1e-30])
def test_tiny_temperatures_over_http_are_answered(served, temperature):
    url, _, _ = served
    response = httpx.post(f"{url}/think", json={"prompt": "hi", "max_new_tokens": 4, "temperature": temperature},
                          timeout=120)
    assert response.status_code == 200 and response.json()["outcome"] == "answered"


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"prompt": "hi", "max_new_tokens": True}, "max_new_tokens", "valid integer"),
        ({"prompt": "hi", "max_new_tokens": "5"}, "max_new_tokens", "valid integer"),
        ({"prompt": "hi", "max_new_tokens": 5.5}, "max_new_tokens", "valid integer"),
        ({"prompt": "hi", "return_thinking": 1}, "return_thinking", "valid boolean"),
        ({"prompt": "hi", "return_thinking": "true"}, "return_thinking", "valid boolean"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature", "valid number"),
        ({"prompt": "hi", "top_p": None}, "top_p", "valid number"),
    ],
)
def test_lax_types_are_refused(served, body, field, reason):
    url, _, _ = served
    response = httpx.post(f"{url}/think", json=body, timeout=120)
    assert response.status_code == 422, response.text
    assert any(item["field"] == field and reason in item["reason"] for item in response.json()["detail"])


def test_invalid_utf8_is_the_documented_422(served):
    url, _, _ = served
    response = httpx.post(f"{url}/think", content=b'{"prompt": "caf\xe9"}', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"request_id": response.headers["x-request-id"], "error": "invalid request",
                               "detail": [{"field": "body", "reason": "invalid UTF-8: invalid continuation byte "
                                                                     "at byte 15"}]}
    chat = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "\xff"}', timeout=30,
                      headers={"content-type": "application/json"})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "body"


@pytest.mark.parametrize(("body", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
    (b'{"prompt": "caf\xe9"}', "invalid UTF-8"),
    (b"prompt=hi", "JSON decode error: Expecting value"),
])
def test_a_body_that_cannot_be_parsed_is_bad_input_with_its_request_id_and_row(served, body, reason):
    url, audit, path = served
    think = httpx.post(f"{url}/think", content=body, timeout=30, headers={"content-type": "application/json"})
    chat = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json"})
    assert think.status_code == 422 and think.json()["request_id"] == think.headers["x-request-id"]
    [detail] = think.json()["detail"]
    assert detail["field"] == "body" and reason in detail["reason"], detail
    assert chat.status_code == 400 and chat.json()["request_id"] == chat.headers["x-request-id"]
    error = chat.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "body", "invalid_request")
    assert reason in error["message"]
    rows = {row.request_id: row for row in read_rows(path)}
    for response in (think, chat):
        row = rows[response.headers["x-request-id"]]
        assert (row.outcome, row.status, row.prompt_hmac) == ("rejected", response.status_code, None)


def test_an_integral_float_is_an_integer_as_the_schema_says(served):
    url, _, _ = served
    response = httpx.post(f"{url}/think", json={"prompt": "hi", "max_new_tokens": 3.0, "temperature": 0}, timeout=120)
    assert response.status_code == 200 and response.json()["monitor"]["generated_tokens"] <= 3


def test_a_full_audit_disk_is_a_503_with_request_id_counted_and_logged(served, caplog):
    url, audit, path = served
    before = len(read_rows(path))
    connection = audit._connection  # SQLite's own "database or disk is full", without filling a disk
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")
    try:
        with caplog.at_level(logging.ERROR, logger="so8t.serve"):
            responses = [httpx.post(f"{url}/think", json={"prompt": "x" * 200, "max_new_tokens": 2}, timeout=120)
                         for _ in range(40)]
            refused = [response for response in responses if response.status_code == 503]
            assert refused, "the page limit was never reached"
    finally:
        connection.execute("PRAGMA max_page_count = 1073741823")
    for response in refused:
        assert response.json() == {"request_id": response.headers["x-request-id"], "error": "audit log unavailable",
                                   "detail": "the request's audit row could not be written; nothing was answered"}
    assert "database or disk is full" in caplog.text and "no transaction is active" not in caplog.text
    metrics = parse_metrics(httpx.get(f"{url}/metrics").text)
    failures = metrics["so8t_audit_write_failures"]["samples"]["so8t_audit_write_failures_total"]
    assert list(failures.values()) == [len(refused)]
    counted = metrics["so8t_think_requests"]["samples"]["so8t_think_requests_total"]
    assert counted[frozenset({("label", "none"), ("outcome", "error"), ("status", "503")})] == len(refused)
    after = httpx.post(f"{url}/think", json={"prompt": "hi", "max_new_tokens": 2}, timeout=120)
    assert after.status_code == 200
    rows = read_rows(path)
    assert verify(path, audit).ok and len(rows) == before + len(responses) - len(refused) + 1
    assert {row.request_id for row in rows}.isdisjoint(response.headers["x-request-id"] for response in refused)


def test_a_judge_that_raises_is_a_json_500_with_a_row(engine, tmp_path):
    judge = nan_judge()

    def broken(text):
        raise RuntimeError("judge exploded")

    judge.judge = broken
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(engine, audit, judge)) as url:
        response = httpx.post(f"{url}/think", json={"prompt": "hello"}, timeout=120)
    audit.close()
    assert response.status_code == 500
    assert response.json() == {"request_id": response.headers["x-request-id"], "error": "model call failed"}
    [row] = read_rows(tmp_path / "audit.db")
    assert (row.outcome, row.status, row.error) == ("error", 500, "RuntimeError")


def test_a_stream_whose_audit_row_cannot_be_written_ends_with_an_error_event(served, engine):
    url, audit, path = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    connection = audit._connection
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")
    failed = []
    try:
        for index in range(40):
            stream = client.chat.completions.create(
                model=engine.name, messages=[{"role": "user", "content": "y" * 200 + str(index)}],
                max_tokens=2, temperature=0, stream=True)
            chunks = []
            try:
                chunks.extend(stream)
            except openai.APIError as error:
                failed.append((error, chunks))
                break
    finally:
        connection.execute("PRAGMA max_page_count = 1073741823")
    [(error, chunks)] = failed
    assert "audit row could not be written" in error.message
    assert "the answer was sent but could not be audited" in error.message  # not "nothing was answered"
    assert chunks and all(chunk.choices[0].finish_reason is None for chunk in chunks)  # no final chunk
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    assert request_id not in {row.request_id for row in read_rows(path)} and verify(path, audit).ok
