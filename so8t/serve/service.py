"""What both APIs do with a request, between validation and the response body: admission (503 when
full), the safety judge, encoding, generation on the model thread (cancelled when the client goes
away), and the audit record filled in on the way."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import Request

from ..audit.log import AuditRecord
from ..judge.judge import ALLOW, DENY, SafetyJudge, Verdict
from .errors import ApiError, invalid_status
from .generation import ContextOverflow, Generation, GenerationRequest, TextGenerator
from .ledger import STATE_RECORD, STATE_REQUEST_ID, STATE_STARTED, Ledger, latency_ms_since
from .metrics import ServeMetrics
from .scheduler import Scheduler
from .thinking import ParsedCompletion

OUTCOME_OF_LABEL = {ALLOW: "answered", DENY: "denied"}  # ESCALATE (and anything else): "escalated"
CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": nobody reads the response
RETRY_AFTER_S = 1  # a batch of the demo model takes well under a second; clients back off and retry

log = logging.getLogger("so8t.serve")


class Refusal(Exception):
    """Ends a request with an error response (``ApiError``) and the audit outcome for it."""

    def __init__(self, error: ApiError, outcome: str, headers: dict | None = None):
        super().__init__(error.error)
        self.error = error
        self.outcome = outcome
        self.headers = headers or {}


@dataclass
class Decision:
    outcome: str  # answered, escalated or denied
    verdict: Verdict | None
    request: GenerationRequest | None  # None unless answered


class Service:
    def __init__(self, generator: TextGenerator, judge: SafetyJudge | None, scheduler: Scheduler,
                 ledger: Ledger, metrics: ServeMetrics):
        self.generator = generator
        self.judge = judge
        self.scheduler = scheduler
        self.ledger = ledger
        self.metrics = metrics

    def start_record(self, request: Request, prompt_text: str) -> AuditRecord:
        """The request's audit record, left where the ledger finds it; "error" until something better is known."""
        state = request.scope["state"]
        record = AuditRecord(state[STATE_REQUEST_ID], "error", 500, 0.0,
                             prompt_hmac=self.ledger.audit.digest(prompt_text))
        state[STATE_RECORD] = record
        return record

    def record_outputs(self, record: AuditRecord, parsed: ParsedCompletion) -> None:
        """Keyed digests of the thinking and the answer (the client gets the plain SHA-256 of the thinking)."""
        record.thinking_hmac = self.ledger.audit.digest(parsed.thinking)
        record.answer_hmac = self.ledger.audit.digest(parsed.answer)

    @staticmethod
    def finish_record(request: Request, record: AuditRecord, outcome: str) -> None:
        record.outcome, record.latency_ms = outcome, latency_ms_since(request.scope["state"][STATE_STARTED])

    async def decide(self, request: Request, record: AuditRecord, judged_text: str, prompt, max_new_tokens: int,
                     temperature: float, top_p: float, stop: tuple[str, ...] = (),
                     length_field: str = "max_new_tokens") -> Decision:
        """Judge, then encode: raises Refusal for a prompt that does not fit the context (naming the
        request's own field for the token count, ``length_field``)."""
        verdict = None
        if self.judge is not None:
            verdict = await self.scheduler.call(self.judge.judge, judged_text)
            record.safety_label, record.safety_confidence = verdict.label, verdict.confidence
        outcome = OUTCOME_OF_LABEL.get(verdict.label, "escalated") if verdict is not None else "answered"
        if outcome != "answered":
            return Decision(outcome, verdict, None)
        try:
            ids = self.generator.encode(prompt, max_new_tokens)
        except ContextOverflow as overflow:
            status = invalid_status(request.scope["path"])
            field = length_field if overflow.field == "max_new_tokens" else overflow.field
            raise Refusal(ApiError.invalid(status, [(field, overflow.reason)]), "rejected") from None
        return Decision(outcome, verdict, GenerationRequest(ids, max_new_tokens, temperature, top_p, stop))

    async def generate(self, request: Request, generation_request: GenerationRequest) -> Generation:
        """Generates on the model thread; raises Refusal("cancelled") if the client disconnects first."""
        task = asyncio.ensure_future(self.scheduler.generate(generation_request))
        watcher = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            raise Refusal(ApiError(CLIENT_CLOSED_STATUS, "client closed request"), "cancelled")
        generation = task.result()
        self.metrics.generated_tokens.inc(generation.new_tokens)
        return generation


def busy_refusal() -> Refusal:
    return Refusal(ApiError(503, "server busy", message="too many requests in the server; retry after "
                            f"{RETRY_AFTER_S} s"), "rejected", {"retry-after": str(RETRY_AFTER_S)})


def model_failure(request_id: str, error: Exception) -> Refusal:
    log.error("model call failed for request %s", request_id, exc_info=error)
    return Refusal(ApiError(500, "model call failed"), "error")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

