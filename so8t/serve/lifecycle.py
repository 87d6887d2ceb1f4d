"""One audited request's life, from arrival to its audit row: ``RequestAudit`` owns the row (start,
judged, answered, finish, write once). The audit middleware (middleware.py) gives each request to /think
and /v1/chat/completions one and writes it when the response starts; a route fills it in; a stream
``defer``s it and writes it before its last event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import Request

from ..audit.log import AuditLog, AuditRecord
from ..judge.judge import Verdict
from .metrics import ServeMetrics
from .responses import ApiError
from .thinking import ParsedCompletion

STATE_KEY = "so8t_audit"  # the RequestAudit in the ASGI scope's state
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads the response
AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable",
                             message="the request's audit row could not be written; nothing was answered")
# A stream's row is written when it ends, after its answer's text went out.
STREAM_AUDIT_UNAVAILABLE = ApiError(503, "audit log unavailable", message=(
    "the answer was sent but could not be audited: the request's audit row could not be written"))

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
