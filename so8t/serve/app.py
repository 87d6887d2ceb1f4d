"""The FastAPI app of ``so8t serve``: POST /think, GET /health, GET /metrics.

A /think request goes: safety judge (if configured) → generation (ALLOW only) → thinking parse and
hashes → response. Both model calls run on the one model thread (worker.py); the audit row and the
metrics of every request, answered or not, are ThinkLedger's (ledger.py).
"""

from __future__ import annotations

import contextlib
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..audit import AuditLog, AuditRecord
from ..judge import ALLOW, DENY, SafetyJudge, Verdict
from .generation import ContextOverflow, Generation, TextGenerator
from .ledger import STATE_RECORD, STATE_REQUEST_ID, STATE_STARTED, ThinkLedger, latency_ms_since
from .metrics import ServeMetrics
from .schemas import Monitor, Safety, ThinkRequest, ThinkResponse
from .thinking import parse_thinking, sha256_text
from .worker import ModelWorker

# Room for a 16,000-character prompt even if every character is a 12-byte JSON escape, and the rest.
MAX_BODY_BYTES = 256 * 1024
OUTCOME_OF_LABEL = {ALLOW: "answered", DENY: "denied"}  # ESCALATE (and anything else): "escalated"

log = logging.getLogger("so8t.serve")


def create_app(generator: TextGenerator, audit: AuditLog, judge: SafetyJudge | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    metrics = ServeMetrics()
    worker = ModelWorker(on_depth_change=metrics.queue_depth.set)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="so8t", summary="SO(8)-gated model with a hash-audited /think endpoint", lifespan=lifespan)
    app.add_middleware(ThinkLedger, audit=audit, metrics=metrics, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid(request, [{"field": _field_name(item["loc"]), "reason": _reason(item)} for item in error.errors()])

    @app.post("/think", response_model=ThinkResponse,
              responses={413: {"description": "body too large"}, 422: {"description": "invalid field"}})
    async def think(request: Request, body: ThinkRequest) -> JSONResponse:
        state = request.scope["state"]
        request_id = state[STATE_REQUEST_ID]
        record = AuditRecord(request_id, "error", 500, 0.0, prompt_sha256=sha256_text(body.prompt))
        state[STATE_RECORD] = record
        verdict = generation = None
        try:
            if judge is not None:
                verdict = await worker.run(judge.judge, body.prompt)
                record.safety_label, record.safety_confidence = verdict.label, verdict.confidence
            outcome = OUTCOME_OF_LABEL.get(verdict.label, "escalated") if verdict is not None else "answered"
            if outcome == "answered":
                generation = await worker.run(generator.generate, body.prompt, body.max_new_tokens,
                                              body.temperature, body.top_p)
        except ContextOverflow as overflow:
            record.outcome, record.latency_ms = "rejected", latency_ms_since(state[STATE_STARTED])
            return _invalid(request, [{"field": overflow.field, "reason": overflow.reason}])
        except Exception as error:  # the row says error; the client gets a 500 without internals
            log.exception("model call failed for request %s", request_id)
            record.error, record.latency_ms = type(error).__name__, latency_ms_since(state[STATE_STARTED])
            return JSONResponse({"request_id": request_id, "error": "model call failed"}, status_code=500)
        response = _response(request_id, outcome, body, verdict, generation, latency_ms_since(state[STATE_STARTED]))
        record.outcome, record.latency_ms = outcome, response.latency_ms
        record.thinking_sha256 = response.thinking_sha256
        record.answer_sha256 = sha256_text(response.answer) if response.answer is not None else None
        if generation is not None:
            metrics.generated_tokens.inc(generation.new_tokens)
        return JSONResponse(response.body())

    @app.get("/health")
    async def health() -> dict:
        gated = generator.handle.layer_indices if generator.handle is not None else []
        return {"status": "ok", "model": generator.name, "gated_layers": gated,
                "safety_model": judge is not None, "queue_depth": worker.depth}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


def _response(request_id: str, outcome: str, body: ThinkRequest, verdict: Verdict | None,
              generation: Generation | None, latency_ms: float) -> ThinkResponse:
    safety = None
    if verdict is not None:
        safety = Safety(label=verdict.label, confidence=verdict.confidence, predicted=verdict.predicted,
                        reason=verdict.reason)
    if generation is None:
        return ThinkResponse(request_id=request_id, outcome=outcome, answer=None, thinking_sha256=None,
                             thinking_parse=None, safety=safety, latency_ms=latency_ms)
    parsed = parse_thinking(generation.text)
    monitor = Monitor(
        generated_tokens=generation.new_tokens, logit_mean=_finite(generation.logit_mean),
        logit_std=_finite(generation.logit_std), logit_min=_finite(generation.logit_min),
        logit_max=_finite(generation.logit_max), logit_nonfinite=generation.logit_nonfinite,
        sigma_alpha={str(layer): gate for layer, gate in generation.sigma_alpha.items()},
    )
    return ThinkResponse(
        request_id=request_id, outcome=outcome, answer=parsed.answer, thinking_sha256=parsed.thinking_sha256,
        thinking_parse=parsed.case, thinking=parsed.thinking if body.return_thinking else None,
        safety=safety, monitor=monitor, latency_ms=latency_ms,
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf


def _field_name(location) -> str:
    # ("body", "top_p") → "top_p"; ("body", 15), a JSON syntax error at character 15 → "body".
    parts = [part for part in location if isinstance(part, str) and part != "body"]
    return ".".join(parts) or "body"


def _reason(item: dict) -> str:
    detail = (item.get("ctx") or {}).get("error")  # e.g. the JSON decoder's message
    return f"{item['msg']}: {detail}" if isinstance(detail, str) else item["msg"]


def _invalid(request: Request, details: list[dict]) -> JSONResponse:
    request_id = request.scope.get("state", {}).get(STATE_REQUEST_ID)
    return JSONResponse({"request_id": request_id, "error": "invalid request", "detail": details}, status_code=422)
