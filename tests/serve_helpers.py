"""A real uvicorn server on 127.0.0.1 (a free port, a thread of the test process), readers for what it
writes (Prometheus text and audit rows), and the engine driven directly: what the server should answer."""

import asyncio
import contextlib
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from so8t.audit.anchors import read_anchors
from so8t.audit.log import AuditKey, AuditLog, read_rows
from so8t.audit.verify import Verification, verify_chain
from so8t.commands.serve import bind_socket, build_server
from so8t.serve.engines.base import Completion, EngineRequest, SamplingParams, TextDelta
from so8t.serve.engines.hf_batch import Row

STARTUP_TIMEOUT_S = 60


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test models are tiny: on a 2-core machine that other processes share, torch's two threads
    spin against each other (training the judge fixture took 320 s with two, 21 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running_server(app):
    """Serves ``app`` until the block ends; yields its base URL once /health answers."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = build_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, thread)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


def wait_for_health(url: str, thread: threading.Thread | None = None, process=None) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the server thread ended before /health answered")
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before /health answered")
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health did not answer within {STARTUP_TIMEOUT_S} s")


def parse_metrics(text: str) -> dict[str, dict]:
    """Metric families by name (prometheus_client's own parser: it rejects malformed exposition),
    each ``{sample name: {frozenset(labels): value}}``."""
    families = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {"type": family.type, "samples": {}})["samples"]
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return families


def request_counts(metrics_text: str) -> dict[tuple[str, str, str], float]:
    """so8t_think_requests_total by (label, outcome, status)."""
    samples = parse_metrics(metrics_text)["so8t_think_requests"]["samples"]["so8t_think_requests_total"]
    return {(dict(labels)["label"], dict(labels)["outcome"], dict(labels)["status"]): value
            for labels, value in samples.items()}


def open_audit(path) -> AuditLog:
    """An audit log with its key and anchors next to it, as so8t serve's defaults put them."""
    key, _ = AuditKey.load_or_create(f"{path}.key")
    return AuditLog(path, key, f"{path}.anchors")


def verify(path, audit_or_key) -> Verification:
    """The chain of the log at ``path`` checked with the key (an AuditLog's or an AuditKey) and its anchors."""
    key = audit_or_key.key if isinstance(audit_or_key, AuditLog) else audit_or_key
    anchors = read_anchors(f"{path}.anchors") if Path(f"{path}.anchors").is_file() else []
    return verify_chain(read_rows(path), key, anchors)


def request(engine, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
            stop: tuple[str, ...] = ()) -> EngineRequest:
    """An engine request for ``prompt`` (text, or chat messages) as the server makes one."""
    return EngineRequest(uuid.uuid4().hex, engine.encode(prompt, max_new_tokens),
                         SamplingParams(max_new_tokens, temperature, top_p, stop))


def complete(engine, prompt, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop: tuple[str, ...] = ()) -> Completion:
    """What the engine generates for one request alone (greedy by default)."""
    return asyncio.run(engine.generate(request(engine, prompt, max_new_tokens, temperature, top_p, stop)))


def decode_together(engine, requests: list[EngineRequest], deltas: bool = False) -> tuple[list[Completion], list]:
    """The requests decoded as one batch by the engine's decoder in this thread (its model thread is idle),
    with each row's TextDeltas (when ``deltas``)."""
    events = [[] for _ in requests]
    rows = [Row(engine_request, events[index].append, deltas) for index, engine_request in enumerate(requests)]
    engine.decoder.run(rows)
    completions = [next(event for event in row_events if isinstance(event, Completion)) for row_events in events]
    return completions, [[event.text for event in row_events if isinstance(event, TextDelta)] for row_events in events]
