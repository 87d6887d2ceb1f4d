"""ASGI middleware around /think: request id, body size limit, and the one audit row and metrics
sample of every request, whatever became of it.

It sits outside FastAPI's routing and validation, so it sees every /think request: the ones the
handler answered (the handler leaves an AuditRecord in the request state), the ones validation
rejected (422) and the ones it refuses itself (413). The row is written before the response starts:
once a client has its answer, the row is in the database.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from ..audit import AuditLog, AuditRecord
from .metrics import ServeMetrics

THINK_PATH = "/think"
REQUEST_ID_HEADER = b"x-request-id"
STATE_REQUEST_ID = "so8t_request_id"
STATE_STARTED = "so8t_started"  # time.perf_counter() when the request arrived
STATE_RECORD = "so8t_audit_record"


def latency_ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


class ThinkLedger:
    def __init__(self, app, audit: AuditLog, metrics: ServeMetrics, max_body_bytes: int):
        self.app = app
        self.audit = audit
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != THINK_PATH:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update({STATE_REQUEST_ID: request_id, STATE_STARTED: started})
        recorded = False

        async def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            record = state.get(STATE_RECORD)
            if record is None:  # never reached the handler, or it raised before finishing
                outcome = "rejected" if 400 <= status < 500 else "error"
                record = AuditRecord(request_id, outcome, status, latency_ms_since(started))
            record.status = status
            if status >= 500 and record.outcome != "error":
                record.outcome = "error"
            # SQLite (fsync per row) off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.audit.append, record)
            self.metrics.observe_request(record.safety_label, record.outcome, status, record.latency_ms / 1000.0)

        async def send_recorded(message):
            if message["type"] == "http.response.start":
                await record(message["status"])
                headers = list(message.get("headers", [])) + [(REQUEST_ID_HEADER, request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await self._reply_too_large(send_recorded, request_id)
                return
            await self.app(scope, _replay(body, receive), send_recorded)
        finally:
            if not recorded:  # the app raised before responding: the server error handler answers 500
                await record(500)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it is over the limit (by Content-Length, or by counting)."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _reply_too_large(self, send, request_id: str) -> None:
        body = (f'{{"request_id":"{request_id}","error":"request body too large",'
                f'"detail":"the body is over {self.max_body_bytes} bytes"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A receive() that hands the app the body read already, then passes on (e.g. the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
