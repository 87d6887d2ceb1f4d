"""so8t serve end to end: a real uvicorn server on 127.0.0.1 serving a `so8t train` output (LoRA and
gates), driven over HTTP. Answers and hashes, the audit row of every request (413 and 422 included),
bad input, concurrency, /metrics, and the chain verified and tampered with through the command line.

The tests share one server and run in file order; each request goes through ``Client.think``, which
remembers it, so the audit and metrics tests can check the server against everything sent before.
"""

import asyncio
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from safetensors.torch import load_file
from serve_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    complete,
    one_torch_thread,
    open_audit,
    parse_metrics,
    request_counts,
    running_server,
    verify,
)

from so8t.audit.log import read_rows
from so8t.commands.main import main
from so8t.models.loading import load_model_and_tokenizer
from so8t.serve.app import MAX_BODY_BYTES, create_app
from so8t.serve.engines.hf import HFEngine
from so8t.serve.thinking import CASES, parse_thinking

PROMPT = "What is 16 + 25?"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Client:
    url: str
    audit_path: object
    engine: object
    audit: object
    sent: list = field(default_factory=list)  # (request id, prompt or None, status, response json)

    def think(self, body=None, **kwargs) -> httpx.Response:
        response = httpx.post(f"{self.url}/think", json=body, timeout=120, **kwargs)
        self.remember(response, body.get("prompt") if isinstance(body, dict) else None)
        return response

    def remember(self, response: httpx.Response, prompt) -> None:
        payload = response.json() if response.headers.get("content-type") == "application/json" else None
        self.sent.append((response.headers["x-request-id"], prompt, response.status_code, payload))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--model", "demo", "--output-dir", str(output), "--max-steps", "40", "--warmup-steps", "10"]) == 0
    return output


@pytest.fixture(scope="module")
def client(adapter_dir, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("audit") / "audit.db"
    engine = HFEngine.load(adapter=str(adapter_dir))
    audit = open_audit(audit_path)
    with running_server(create_app(engine, audit)) as url:
        yield Client(url, audit_path, engine, audit)
    audit.close()
    engine.shutdown()


def test_the_adapter_of_so8t_train_is_what_is_served(client, adapter_dir):
    saved = load_file(adapter_dir / "so8t" / "so8t_adapter.safetensors")
    handle = client.engine.handle
    assert torch.equal(handle.theta.detach(), saved["theta"]) and torch.equal(handle.alpha.detach(), saved["alpha"])
    assert client.engine.sigma_alpha == pytest.approx(dict(zip(handle.layer_indices,
                                                                torch.sigmoid(saved["alpha"]).tolist())))
    base = HFEngine.load()  # the embedded base with fresh gates: LoRA must have changed the weights
    base.shutdown()
    served_weight = client.engine.model.model.layers[1].self_attn.qkv_proj.weight
    assert not torch.equal(served_weight, base.model.model.layers[1].self_attn.qkv_proj.weight)
    health = httpx.get(f"{client.url}/health").json()
    assert health == {"status": "ok", "model": "so8t-demo-phi3+run", "gated_layers": [1, 2, 3, 4],
                      "safety_model": False, "queue_depth": 0}


def test_the_embedded_base_is_rebuilt_from_the_seed_the_adapter_was_trained_on(adapter_dir, tmp_path):
    assert json.loads((adapter_dir / "embedded_base.json").read_text()) == {"seed": 0}
    (tmp_path / "embedded_base.json").write_text(json.dumps({"seed": 3}))
    engine = HFEngine.load(adapter=str(tmp_path))
    engine.shutdown()
    served = engine.model.model.layers[1].self_attn.qkv_proj.weight
    seeded, _ = load_model_and_tokenizer(seed=3)
    default, _ = load_model_and_tokenizer()
    assert torch.equal(served, seeded.model.layers[1].self_attn.qkv_proj.weight)
    assert not torch.equal(served, default.model.layers[1].self_attn.qkv_proj.weight)


def test_answer_thinking_and_hashes(client):
    response = client.think({"prompt": PROMPT, "max_new_tokens": 40, "temperature": 0, "return_thinking": True})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"] and len(body["request_id"]) == 32
    assert body["outcome"] == "answered" and "safety" not in body
    assert body["thinking_sha256"] == sha256(body["thinking"])
    assert body["thinking_parse"] in CASES and body["thinking"]  # the adapter learnt to open <think>
    # Greedy decoding: the server returns exactly the parse of what the model generates.
    expected = parse_thinking(complete(client.engine, PROMPT, 40).text)
    assert (body["thinking"], body["answer"], body["thinking_parse"]) == (expected.thinking, expected.answer, expected.case)
    monitor = body["monitor"]
    assert 1 <= monitor["generated_tokens"] <= 40 and monitor["logit_nonfinite"] == 0
    assert monitor["logit_min"] <= monitor["logit_mean"] <= monitor["logit_max"] and monitor["logit_std"] > 0
    assert monitor["sigma_alpha"] == pytest.approx({str(k): v for k, v in client.engine.sigma_alpha.items()})
    assert 0 < body["latency_ms"] < 120_000

    again = client.think({"prompt": PROMPT, "max_new_tokens": 40, "temperature": 0}).json()
    assert "thinking" not in again and again["thinking_sha256"] == body["thinking_sha256"]
    assert again["request_id"] != body["request_id"]


def test_sampling_parameters_are_used(client):
    bodies = [client.think({"prompt": PROMPT, "max_new_tokens": 12, "temperature": 2.0, "top_p": 1.0,
                            "return_thinking": True}).json() for _ in range(3)]
    assert all(body["outcome"] == "answered" for body in bodies)
    assert all(body["thinking_sha256"] == sha256(body["thinking"]) for body in bodies)
    # At temperature 2 over 12 tokens three identical completions would be a sampling bug.
    assert len({(body["thinking"], body["answer"]) for body in bodies}) > 1


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"prompt": "x" * 16_001}, "prompt", "at most 16000 characters"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"max_new_tokens": 5}, "prompt", "Field required"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
        ({"prompt": "hi", "max_new_tokens": 2049}, "max_new_tokens", "less than or equal to 2048"),
        ({"prompt": "hi", "max_new_tokens": "ten"}, "max_new_tokens", "valid integer"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "hi", "top_p": 1.01}, "top_p", "less than or equal to 1"),
        ({"prompt": "hi", "return_thinking": "maybe"}, "return_thinking", "valid boolean"),
        ({"prompt": "hi", "max_tokens": 5}, "max_tokens", "Extra inputs are not permitted"),
        ({"prompt": 42}, "prompt", "valid string"),
        (["hi"], "body", "valid dictionary"),
        # Valid for the API, too long for the demo model's 512-token context.
        ({"prompt": "hi", "max_new_tokens": 2048}, "max_new_tokens", "new tokens fit the model's context of 512"),
        ({"prompt": "y" * 600, "max_new_tokens": 1}, "prompt", "the model reads at most 512"),
    ],
)
def test_bad_input_is_422_with_field_and_reason(client, body, field, reason):
    response = client.think(body)
    assert response.status_code == 422
    payload = response.json()
    assert payload["request_id"] == response.headers["x-request-id"]
    assert any(item["field"] == field and reason in item["reason"] for item in payload["detail"]), payload


def test_malformed_json_is_422(client):
    response = httpx.post(f"{client.url}/think", content=b'{"prompt": "hi"', timeout=30,
                          headers={"content-type": "application/json"})
    client.remember(response, None)
    assert response.status_code == 422
    assert response.json()["detail"] == [{"field": "body", "reason": "JSON decode error: Expecting ',' delimiter"}]


def test_oversized_body_is_413_by_header_and_by_count(client):
    oversized = b'{"prompt": "' + b"z" * MAX_BODY_BYTES + b'"}'
    by_header = httpx.post(f"{client.url}/think", content=oversized, timeout=30,
                           headers={"content-type": "application/json"})
    client.remember(by_header, None)
    assert by_header.status_code == 413 and by_header.json()["error"] == "request body too large"

    def chunks():  # no Content-Length: the server has to count
        for start in range(0, len(oversized), 16_384):
            yield oversized[start:start + 16_384]

    by_count = httpx.post(f"{client.url}/think", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    client.remember(by_count, None)
    assert by_count.status_code == 413 and "transfer-encoding" not in by_count.request.headers.get("content-length", "")
    assert by_count.request.headers.get("transfer-encoding") == "chunked"


def test_concurrent_requests_are_all_answered_while_the_event_loop_stays_free(client):
    prompts = [f"What is {n} + {n}?" for n in range(8)]

    async def burst():
        async with httpx.AsyncClient(base_url=client.url, timeout=120) as http:
            requests = [asyncio.create_task(http.post("/think", json={"prompt": p, "max_new_tokens": 16, "temperature": 0}))
                        for p in prompts]
            depths = []
            while not all(task.done() for task in requests):
                depths.append((await http.get("/health", timeout=10)).json()["queue_depth"])
                await asyncio.sleep(0.05)
            return [task.result() for task in requests], depths

    responses, depths = asyncio.run(burst())
    for prompt, response in zip(prompts, responses):
        client.remember(response, prompt)
        assert response.status_code == 200 and response.json()["outcome"] == "answered"
    assert len({response.json()["request_id"] for response in responses}) == len(prompts)
    assert max(depths) >= 2  # /health answered while requests queued for the model thread


def test_a_failing_model_call_is_a_500_with_an_error_row(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(client.engine.decoder, "run", broken)
    response = client.think({"prompt": "this one fails"})
    assert response.status_code == 500
    assert response.json() == {"request_id": response.headers["x-request-id"], "error": "model call failed"}
    row = next(row for row in read_rows(client.audit_path) if row.request_id == response.headers["x-request-id"])
    assert (row.outcome, row.status, row.error) == ("error", 500, "RuntimeError")
    assert row.prompt_hmac == client.audit.digest("this one fails") != sha256("this one fails")


def test_every_request_has_one_audit_row(client):
    rows = {row.request_id: row for row in read_rows(client.audit_path)}
    assert len(rows) == len(client.sent) == len(set(rows))
    for request_id, prompt, status, payload in client.sent:
        row = rows[request_id]
        assert row.status == status
        assert row.safety_label is None and row.safety_confidence is None
        if status == 200:
            assert row.outcome == "answered" and row.prompt_hmac == client.audit.digest(prompt)
            assert row.thinking_hmac is not None and row.thinking_hmac != payload["thinking_sha256"]  # keyed
            if "thinking" in payload:
                assert row.thinking_hmac == client.audit.digest(payload["thinking"])
            assert row.answer_hmac == client.audit.digest(payload["answer"])
            assert row.latency_ms == pytest.approx(payload["latency_ms"])
        elif status in (413, 422):
            assert row.outcome == "rejected" and row.thinking_hmac is None and row.answer_hmac is None
        else:
            assert row.outcome == "error"
    assert verify(client.audit_path, client.audit).ok


def test_metrics_count_every_request_by_label_outcome_and_status(client):
    text = httpx.get(f"{client.url}/metrics").text
    families = parse_metrics(text)
    expected = {}
    for _, _, status, _ in client.sent:
        outcome = {200: "answered", 500: "error"}.get(status, "rejected")
        expected[("none", outcome, str(status))] = expected.get(("none", outcome, str(status)), 0) + 1
    assert request_counts(text) == expected
    histogram = families["so8t_think_latency_seconds"]
    assert histogram["type"] == "histogram"
    buckets = sorted(((float(dict(labels)["le"]), value) for labels, value in
                      histogram["samples"]["so8t_think_latency_seconds_bucket"].items()))
    assert buckets[-1][0] == math.inf and buckets[-1][1] == len(client.sent)
    assert all(low[1] <= high[1] for low, high in zip(buckets, buckets[1:]))
    assert list(histogram["samples"]["so8t_think_latency_seconds_count"].values()) == [len(client.sent)]
    tokens = sum(payload["monitor"]["generated_tokens"] for _, _, status, payload in client.sent if status == 200)
    assert list(families["so8t_generated_tokens"]["samples"]["so8t_generated_tokens_total"].values()) == [tokens]
    assert list(families["so8t_model_queue_depth"]["samples"]["so8t_model_queue_depth"].values()) == [0]


def test_audit_verify_command_on_the_live_log_and_a_tampered_copy(client, tmp_path, capsys):
    key = ["--key-file", f"{client.audit_path}.key"]
    assert main(["audit", "verify", str(client.audit_path), *key, "--anchors", f"{client.audit_path}.anchors"]) == 0
    assert f"{len(client.sent)} rows, chain intact" in capsys.readouterr().out
    copy = tmp_path / "copy.db"
    source, target = sqlite3.connect(client.audit_path), sqlite3.connect(copy)
    source.backup(target)
    source.close()
    with target:
        target.execute("UPDATE audit_log SET answer_hmac = ? WHERE seq = 2", ("f" * 64,))
    target.close()
    # The real command line, once: exit status and message as an operator sees them.
    tampered = subprocess.run([sys.executable, "-m", "so8t", "audit", "verify", str(copy), *key],
                              capture_output=True, text=True, timeout=300)
    second = read_rows(copy)[1].request_id
    assert tampered.returncode == 1
    assert f"chain broken at row 2 (request {second})" in tampered.stderr and "Traceback" not in tampered.stderr
