"""ASGI middleware around the audited endpoints (/think, /v1/chat/completions): request id, body
checks, and the one audit row and metrics sample of every request, whatever became of it.

It sits outside FastAPI's routing and validation, so it sees every audited request: the ones a handler
answered (the handler leaves an AuditRecord in the request state), the ones validation rejected and the
ones it refuses itself (413, a body that is not UTF-8). The row is written before the response starts:
once a client has its answer, the row is in the database. If the row cannot be written (a full disk),
the client gets a 503 with its request id instead of the answer. A streamed response writes its row
itself, before its last event (``STATE_DEFERRED``); whatever a handler leaves unrecorded, an exception
or a vanished client included, this middleware records on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ..audit.log import AuditLog, AuditRecord
from .errors import ApiError, error_bytes, invalid_status
from .metrics import ServeMetrics

AUDITED_PATHS = ("/think", "/v1/chat/completions")
REQUEST_ID_HEADER = b"x-request-id"
STATE_REQUEST_ID = "so8t_request_id"
STATE_STARTED = "so8t_started"  # time.perf_counter() when the request arrived
STATE_RECORD = "so8t_audit_record"
STATE_DEFERRED = "so8t_audit_deferred"  # a streamed response: its handler writes the row
STATE_RECORDED = "so8t_audit_recorded"
AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable",
                             message="the request's audit row could not be written; nothing was answered")
# A stream's row is written when it ends, after its answer's text went out.
STREAM_AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable", message=(
    "the answer was sent but could not be audited: the request's audit row could not be written"))
SERVER_ERROR = ApiError(500, "internal error", message="the server failed on this request; see its log")

log = logging.getLogger("so8t.serve")


def latency_ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


class _ClientGone(Exception):
    """The client disconnected before its body was in."""


class Ledger:
    """Writes audit rows off the event loop and counts every request in the metrics."""

    def __init__(self, audit: AuditLog, metrics: ServeMetrics):
        self.audit = audit
        self.metrics = metrics

    async def write(self, record: AuditRecord) -> bool:
        """False when the row could not be written: the error is logged and counted, the client must
        not get an answer that has no row."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.audit.append, record)  # fsync per row
            written = True
        except Exception:
            log.exception("audit log write failed for request %s (status %s)", record.request_id, record.status)
            self.metrics.audit_write_failures.inc()
            written = False
        outcome, status = (record.outcome, record.status) if written else ("error", AUDIT_UNAVAILABLE.status)
        self.metrics.observe_request(record.safety_label, outcome, status, record.latency_ms / 1000.0)
        return written


class LedgerMiddleware:
    def __init__(self, app, ledger: Ledger, max_body_bytes: int):
        self.app = app
        self.ledger = ledger
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in AUDITED_PATHS:
            return await self.app(scope, receive, send)
        path = scope["path"]
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update({STATE_REQUEST_ID: request_id, STATE_STARTED: started})
        response_started = swallowing = False

        def current_record(status: int) -> AuditRecord:
            record = state.get(STATE_RECORD)
            if record is None:  # never reached the handler
                record = AuditRecord(request_id, "rejected" if 400 <= status < 500 else "error", status,
                                     latency_ms_since(started))
                state[STATE_RECORD] = record
            record.status = status
            if status >= 500 and record.outcome not in ("error", "rejected"):
                record.outcome = "error"
            return record

        async def reply(error: ApiError, extra_headers=()) -> None:
            body = error_bytes(path, request_id, error)
            await send({"type": "http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (REQUEST_ID_HEADER, request_id.encode()), *extra_headers]})
            await send({"type": "http.response.body", "body": body})

        async def send_recorded(message):
            nonlocal response_started, swallowing
            if swallowing:  # the app's answer was replaced by the 503 below
                return
            if message["type"] == "http.response.start":
                response_started = True
                if not state.get(STATE_DEFERRED):
                    state[STATE_RECORDED] = True
                    if not await self.ledger.write(current_record(message["status"])):
                        swallowing = True
                        await reply(AUDIT_UNAVAILABLE)
                        return
                headers = list(message.get("headers", [])) + [(REQUEST_ID_HEADER, request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        async def refuse(error: ApiError, extra_headers=()) -> None:
            nonlocal response_started
            response_started = True
            state[STATE_RECORDED] = True
            written = await self.ledger.write(current_record(error.status))
            await reply(error if written else AUDIT_UNAVAILABLE, extra_headers)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await refuse(ApiError(413, "request body too large",
                                      message=f"the body is over {self.max_body_bytes} bytes"), [(b"connection", b"close")])
                return
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as error:  # JSON is UTF-8; FastAPI would answer a bare 400
                await refuse(ApiError.invalid(invalid_status(path), [("body", f"invalid UTF-8: {error.reason} at byte {error.start}")]))
                return
            await self.app(scope, _replay(body, receive), send_recorded)
        except _ClientGone:  # no one to answer; the row below says so
            state[STATE_RECORD] = AuditRecord(request_id, "cancelled", 499, latency_ms_since(started))
        except Exception:
            log.exception("request %s failed", request_id)
            if not response_started:
                await refuse(SERVER_ERROR)
        finally:
            if not state.get(STATE_RECORDED):  # raised, cancelled, or a stream that ended early
                record = state.get(STATE_RECORD)
                await self.ledger.write(current_record(record.status if record is not None else 500))

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it is over the limit (by Content-Length, or by counting); raises
        _ClientGone when the client disconnects first."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


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
