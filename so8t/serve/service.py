"""What both APIs do with a request between validation and the response body, once: admission (503 when
full), the safety judge, encoding, generation on the engine (cancelled when the client goes away), and
the request's audit row filled in on the way. A route says what to ask (``Job``) and how to answer
(``respond``, and ``stream`` for a streamed answer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request, Response

from ..judge.judge import ALLOW, DENY, SafetyJudge, Verdict
from .admission import Admission, AdmissionGate, ServerBusy
from .engines.base import Completion, ContextOverflow, Engine, EngineRequest, SamplingParams
from .lifecycle import CLIENT_CLOSED_STATUS, RequestAudit
from .metrics import ServeMetrics
from .responses import ApiError, error_response

OUTCOME_OF_LABEL = {ALLOW: "answered", DENY: "denied"}  # ESCALATE (and anything else): "escalated"
RETRY_AFTER_S = 1  # a batch of the demo model takes well under a second; clients back off and retry

log = logging.getLogger("so8t.serve")


class Refusal(Exception):
    """Ends a request with an error response (``ApiError``) and the audit outcome for it."""

    def __init__(self, error: ApiError, outcome: str, headers: dict | None = None):
        super().__init__(error.error)
        self.error = error
        self.outcome = outcome
        self.headers = headers or {}


@dataclass(frozen=True)
class Job:
    judged_text: str  # what the safety judge reads
    prompt: str | list[dict]  # a prompt, or chat messages for the chat template
    sampling: SamplingParams
    # The request's own field for each part a too-long request can shorten ("prompt", "max_new_tokens").
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    outcome: str  # answered, escalated or denied
    verdict: Verdict | None
    request: EngineRequest | None  # None unless answered


class Service:
    def __init__(self, engine: Engine, judge: SafetyJudge | None, gate: AdmissionGate, metrics: ServeMetrics):
        self.engine = engine
        self.judge = judge
        self.gate = gate
        self.metrics = metrics

    async def handle(self, request: Request, audit: RequestAudit, job: Job,
                     respond: Callable[[Decision, Completion | None], Response],
                     stream: Callable[[Decision, Admission], Response] | None = None) -> Response:
        """Admits, judges, generates (or hands an answered request to ``stream``, which then owns its
        place in the server) and answers; every refusal is an error response with its audit outcome."""
        try:
            admission = self.gate.admit()
        except ServerBusy:
            return self.refuse(audit, Refusal(ApiError(503, "server busy", message=(
                f"too many requests in the server; retry after {RETRY_AFTER_S} s")), "rejected",
                {"retry-after": str(RETRY_AFTER_S)}))
        streaming = False
        try:
            decision = await self.decide(audit, job)
            if stream is not None and decision.request is not None:
                streaming = True
                return stream(decision, admission)
            completion = await self.generate(request, decision.request) if decision.request is not None else None
        except Refusal as refusal:
            return self.refuse(audit, refusal)
        except Exception as error:  # the judge or the model failed; the traceback goes to the log only
            return self.refuse(audit, model_failure(audit, error), error)
        finally:
            if not streaming:
                admission.release()
        audit.finish(decision.outcome)
        return respond(decision, completion)

    @staticmethod
    def refuse(audit: RequestAudit, refusal: Refusal, error: BaseException | None = None) -> Response:
        audit.finish(refusal.outcome, error=error)
        return error_response(audit.path, audit.request_id, refusal.error, refusal.headers)

    async def decide(self, audit: RequestAudit, job: Job) -> Decision:
        """Judge, then encode; raises Refusal for a prompt that does not fit the context."""
        verdict = None
        if self.judge is not None:
            verdict = await self.engine.run_exclusive(self.judge.judge, job.judged_text)
            audit.judged(verdict)
        outcome = OUTCOME_OF_LABEL.get(verdict.label, "escalated") if verdict is not None else "answered"
        if outcome != "answered":
            return Decision(outcome, verdict, None)
        try:
            prompt = self.engine.encode(job.prompt, job.sampling.max_new_tokens)
        except ContextOverflow as overflow:
            name = job.fields.get(overflow.field, overflow.field)
            raise Refusal(ApiError.invalid(audit.path, [(name, overflow.reason)]), "rejected") from None
        return Decision(outcome, verdict, EngineRequest(audit.request_id, prompt, job.sampling))

    async def generate(self, request: Request, engine_request: EngineRequest) -> Completion:
        """The completion; raises Refusal("cancelled") if the client disconnects first."""
        task = asyncio.ensure_future(self.engine.generate(engine_request))
        watcher = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            raise Refusal(ApiError(CLIENT_CLOSED_STATUS, "client closed request"), "cancelled")
        completion = task.result()
        self.metrics.generated_tokens.inc(completion.new_tokens)
        return completion


def model_failure(audit: RequestAudit, error: Exception) -> Refusal:
    log.error("model call failed for request %s", audit.request_id, exc_info=error)
    return Refusal(ApiError(500, "model call failed"), "error")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
