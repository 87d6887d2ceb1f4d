"""One audited request's life, from arrival to its audit row: ``RequestAudit`` owns the row (start,
finish, write once), ``AuditMiddleware`` gives every request to /think and /v1/chat/completions one.

The middleware sits outside FastAPI's routing and validation, so it sees every audited request: the
ones a route answered, the ones validation rejected, and the ones it refuses itself (413, a body that
cannot be parsed). The row is written before the response starts: once a client has its answer, the row
is in the database. If the row cannot be written (a full disk), the client gets a 503 with its request id
instead of the answer. A stream ``defer``s its row and writes it before its last event; whatever is
left unwritten (an exception, a client gone) the middleware writes on the way out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request

from ..audit.log import AuditLog, AuditRecord
from ..judge.judge import Verdict
from .metrics import ServeMetrics
from .responses import ApiError, error_bytes
from .thinking import ParsedCompletion

AUDITED_PATHS = ("/think", "/v1/chat/completions")
REQUEST_ID_HEADER = b"x-request-id"
STATE_KEY = "so8t_audit"  # the RequestAudit in the ASGI scope's state
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads the response
AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable",
                             message="the request's audit row could not be written; nothing was answered")
# A stream's row is written when it ends, after its answer's text went out.
STREAM_AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable", message=(
    "the answer was sent but could not be audited: the request's audit row could not be written"))
SERVER_ERROR = ApiError(500, "internal error", message="the server failed on this request; see its log")

log = logging.getLogger("so8t.serve")


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


class RequestAudit:
    """The audit row of one request. Until ``finish`` says otherwise its outcome follows its status
    (499 cancelled, other 4xx rejected, else error); ``write`` writes it once."""

    def __init__(self, ledger: Ledger, path: str):
        self.ledger = ledger
        self.path = path
        self.request_id = uuid.uuid4().hex
        self.started = time.perf_counter()
        self.record = AuditRecord(self.request_id, "error", 500, 0.0)
        self.finished = False
        self.deferred = False  # a stream: written when it ends, not when its response starts
        self._writing: asyncio.Future | None = None

    def start(self, prompt_text: str) -> None:
        """The request reached its route: the keyed digest of what it asks."""
        self.record.prompt_hmac = self.ledger.audit.digest(prompt_text)

    def judged(self, verdict: Verdict) -> None:
        self.record.safety_label, self.record.safety_confidence = verdict.label, verdict.confidence

    def answered(self, parsed: ParsedCompletion) -> None:
        """Keyed digests of the thinking and the answer (the client gets the plain SHA-256 of the thinking)."""
        self.record.thinking_hmac = self.ledger.audit.digest(parsed.thinking)
        self.record.answer_hmac = self.ledger.audit.digest(parsed.answer)

    def finish(self, outcome: str, status: int | None = None, error: BaseException | None = None) -> None:
        self.finished = True
        self.record.outcome, self.record.latency_ms = outcome, self.latency_ms()
        if status is not None:
            self.record.status = status
        if error is not None:
            self.record.error = type(error).__name__

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    @property
    def recorded(self) -> bool:
        """Whether the row's write has begun: the row is final."""
        return self._writing is not None

    async def write(self, status: int | None = None) -> bool:
        """Writes the row (with ``status``, the response's), once; whether it is in the log. A caller
        cancelled while it waits does not stop the write (a later call gets the same result)."""
        if self._writing is None:
            record = self.record
            if status is not None:
                record.status = status
            if not self.finished:
                outcome = ("cancelled" if record.status == CLIENT_CLOSED_STATUS
                           else "rejected" if 400 <= record.status < 500 else "error")
                self.finish(outcome)
            elif record.status >= 500 and record.outcome not in ("error", "rejected"):
                record.outcome = "error"
            self._writing = asyncio.ensure_future(self.ledger.write(record))
        return await asyncio.shield(self._writing)


def request_audit(request: Request) -> RequestAudit:
    return request.scope["state"][STATE_KEY]


class _ClientGone(Exception):
    """The client disconnected before its body was in."""


class _Refused(Exception):
    """The middleware answers the request itself (a body too large or one that cannot be parsed)."""

    def __init__(self, error: ApiError, headers=()):
        super().__init__(error.error)
        self.error = error
        self.headers = list(headers)


class _AuditedSend:
    """The ``send`` the app gets: writes the row when the response starts (unless deferred) and adds the
    request id header; if the row cannot be written, the response is replaced by a 503."""

    def __init__(self, send, audit: RequestAudit):
        self.send = send
        self.audit = audit
        self.started = False
        self.replaced = False

    async def __call__(self, message) -> None:
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            self.started = True
            if not self.audit.deferred and not await self.audit.write(message["status"]):
                self.replaced = True
                await self.reply(AUDIT_UNAVAILABLE)
                return
            message = {**message, "headers": [*message.get("headers", []),
                                              (REQUEST_ID_HEADER, self.audit.request_id.encode())]}
        await self.send(message)

    async def refuse(self, error: ApiError, headers=()) -> None:
        self.started = True
        written = await self.audit.write(error.status)
        await self.reply(error if written else AUDIT_UNAVAILABLE, headers)

    async def reply(self, error: ApiError, headers=()) -> None:
        body = error_bytes(self.audit.path, self.audit.request_id, error)
        await self.send({"type": "http.response.start", "status": error.status,
                         "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode()),
                                     (REQUEST_ID_HEADER, self.audit.request_id.encode()), *headers]})
        await self.send({"type": "http.response.body", "body": body})


class AuditMiddleware:
    def __init__(self, app, ledger: Ledger, max_body_bytes: int):
        self.app = app
        self.ledger = ledger
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in AUDITED_PATHS:
            return await self.app(scope, receive, send)
        audit = RequestAudit(self.ledger, scope["path"])
        scope.setdefault("state", {})[STATE_KEY] = audit
        audited_send = _AuditedSend(send, audit)
        try:
            body = await self._read_body(scope, receive, audit.path)
            await self.app(scope, _replay(body, receive), audited_send)
        except _Refused as refused:
            await audited_send.refuse(refused.error, refused.headers)
        except _ClientGone:  # no one to answer; the row says so
            audit.finish("cancelled", CLIENT_CLOSED_STATUS)
        except Exception:
            log.exception("request %s failed", audit.request_id)
            if not audited_send.started:
                await audited_send.refuse(SERVER_ERROR)
        finally:
            await audit.write()  # raised, cancelled, or a stream that ended early: once in any case

    async def _read_body(self, scope, receive, path: str) -> bytes:
        """The whole body, checked to parse as JSON; raises _Refused (413 once it is over the limit, by
        Content-Length or by counting; bad input for what cannot be parsed), _ClientGone when the client
        disconnects first."""
        too_large = _Refused(ApiError(413, "request body too large", message=f"the body is over {self.max_body_bytes} "
                                      "bytes"), [(b"connection", b"close")])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        reason = unparseable(body) if body else None  # no body at all: FastAPI names what is missing
        if reason is not None:
            raise _Refused(ApiError.invalid(path, [("body", reason)]))
        return body


def unparseable(body: bytes) -> str | None:
    """Why ``body`` is not a JSON document Python can read, or None. FastAPI answers some of these (deep
    nesting, an integer of more than 4300 digits) with a bare 400 and no request id."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        return f"invalid UTF-8: {error.reason} at byte {error.start}"
    except json.JSONDecodeError as error:
        return f"JSON decode error: {error.msg}"
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError as error:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return f"JSON value cannot be read: {error}"
    return None


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
