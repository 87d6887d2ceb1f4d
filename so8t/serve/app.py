"""The FastAPI app of ``so8t serve``: POST /think, the OpenAI-compatible /v1 routes (openai_api.py),
GET /health, GET /metrics.

A request goes: admission (503 beyond --max-queue) → safety judge (if configured) → generation
(ALLOW only, batched with concurrent requests on the one model thread) → thinking parse and hashes →
response. The audit row and the metrics of every request, answered or not, are the ledger's.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..audit.log import AuditLog
from ..judge.judge import SafetyJudge, Verdict
from .errors import ApiError, invalid_status
from .generation import Generation, TextGenerator
from .ledger import Ledger, LedgerMiddleware
from .metrics import ServeMetrics
from .openai_api import add_openai_routes
from .responses import error_response, monitor_of, refuse, safety_of
from .scheduler import Scheduler, ServerBusy
from .schemas import ThinkRequest, ThinkResponse
from .service import Refusal, Service, busy_refusal, model_failure
from .thinking import ParsedCompletion, parse_thinking

# Room for a 16,000-character prompt even if every character is a 12-byte JSON escape, and the rest.
MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64


def create_app(generator: TextGenerator, audit: AuditLog, judge: SafetyJudge | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    metrics = ServeMetrics()
    scheduler = Scheduler(generator, max_batch, max_queue, on_depth_change=metrics.queue_depth.set)
    ledger = Ledger(audit, metrics)
    service = Service(generator, judge, scheduler, ledger, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.shutdown()

    app = FastAPI(title="so8t", summary="SO(8)-gated model with a hash-audited /think endpoint and an "
                  "OpenAI-compatible /v1/chat/completions", lifespan=lifespan)
    app.add_middleware(LedgerMiddleware, ledger=ledger, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        details = [(_field_name(item["loc"]), _reason(item)) for item in error.errors()]
        return error_response(request, ApiError.invalid(invalid_status(request.scope["path"]), details))

    @app.post("/think", response_model=ThinkResponse,
              responses={413: {"description": "body too large"}, 422: {"description": "invalid field"},
                         499: {"description": "the client closed the connection first (audit row only)"},
                         503: {"description": "server full (Retry-After) or audit log unavailable"}})
    async def think(request: Request, body: ThinkRequest) -> Response:
        record = service.start_record(request, body.prompt)
        request_id = record.request_id
        try:
            admission = scheduler.admit()
        except ServerBusy:
            return refuse(request, record, busy_refusal())
        try:
            decision = await service.decide(request, record, body.prompt, body.prompt, body.max_new_tokens,
                                            body.temperature, body.top_p)
            generation = None
            if decision.request is not None:
                generation = await service.generate(request, decision.request)
        except Refusal as refusal:
            return refuse(request, record, refusal)
        except Exception as error:  # the judge or the model failed; the traceback goes to the log only
            record.error = type(error).__name__
            return refuse(request, record, model_failure(request_id, error))
        finally:
            admission.release()
        service.finish_record(request, record, decision.outcome)
        parsed = parse_thinking(generation.text) if generation is not None else None
        if parsed is not None:
            service.record_outputs(record, parsed)
        response = _think_response(request_id, decision.outcome, body, decision.verdict, generation, parsed,
                                   record.latency_ms)
        return JSONResponse(response.body())

    add_openai_routes(app, service)

    @app.get("/health")
    async def health() -> dict:
        gated = generator.handle.layer_indices if generator.handle is not None else []
        return {"status": "ok", "model": generator.name, "gated_layers": gated,
                "safety_model": judge is not None, "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


def _think_response(request_id: str, outcome: str, body: ThinkRequest, verdict: Verdict | None,
                    generation: Generation | None, parsed: ParsedCompletion | None, latency_ms: float) -> ThinkResponse:
    safety = safety_of(verdict)
    if generation is None:
        return ThinkResponse(request_id=request_id, outcome=outcome, answer=None, thinking_sha256=None,
                             thinking_parse=None, safety=safety, latency_ms=latency_ms)
    return ThinkResponse(
        request_id=request_id, outcome=outcome, answer=parsed.answer, thinking_sha256=parsed.thinking_sha256,
        thinking_parse=parsed.case, thinking=parsed.thinking if body.return_thinking else None,
        safety=safety, monitor=monitor_of(generation), latency_ms=latency_ms,
    )


def _field_name(location) -> str:
    # ("body", "top_p") → "top_p"; ("body", 15), a JSON syntax error at character 15 → "body";
    # ("body", "messages", 0, "role") → "messages.0.role".
    parts = [str(part) for position, part in enumerate(location)
             if part != "body" and (isinstance(part, str) or position > 1)]
    return ".".join(parts) or "body"


def _reason(item: dict) -> str:
    detail = (item.get("ctx") or {}).get("error")  # e.g. the JSON decoder's message
    return f"{item['msg']}: {detail}" if isinstance(detail, str) else item["msg"]
