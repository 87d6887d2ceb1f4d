"""The FastAPI app of ``so8t serve``: wires the audit middleware, the routes (/think, the OpenAI-compatible
/v1 routes), GET /health and GET /metrics around one engine.

A request goes: admission (503 beyond ``max_queue``) → safety judge (if configured) → generation on the
engine (ALLOW only) → thinking parse and hashes → response (service.py). Its audit row and metrics sample
are its RequestAudit's (lifecycle.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..audit.log import AuditLog
from ..judge.judge import SafetyJudge
from .admission import AdmissionGate
from .engines.base import Engine
from .lifecycle import Ledger, request_audit
from .middleware import AuditMiddleware
from .metrics import ServeMetrics
from .responses import ApiError, error_response
from .routes.openai import openai_router
from .routes.think import think_router
from .service import Service

# Room for a 16,000-character prompt even if every character is a 12-byte JSON escape, and the rest.
MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_QUEUE = 64


def create_app(engine: Engine, audit: AuditLog, judge: SafetyJudge | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The app around ``engine`` (whose owner shuts it down: one engine may serve several apps in turn)."""
    metrics = ServeMetrics()
    gate = AdmissionGate(max_queue, on_depth_change=metrics.queue_depth.set)
    service = Service(engine, judge, gate, metrics)

    app = FastAPI(title="so8t", summary="SO(8)-gated model with a hash-audited /think endpoint and an "
                  "OpenAI-compatible /v1/chat/completions")
    app.add_middleware(AuditMiddleware, ledger=Ledger(audit, metrics), max_body_bytes=max_body_bytes)
    app.include_router(think_router(service))
    app.include_router(openai_router(service))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        details = [(_field_name(item["loc"]), _reason(item)) for item in error.errors()]
        audit = request_audit(request)
        return error_response(audit.path, audit.request_id, ApiError.invalid(audit.path, details))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, "gated_layers": engine.gated_layers,
                "safety_model": judge is not None, "queue_depth": gate.depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    app.openapi = _naming_the_served_model(app, engine.name)
    return app


def _naming_the_served_model(app: FastAPI, name: str):
    """The published schema says which ``model`` /v1 serves (any other is a 404): clients and schema-driven
    testers send the one that works."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            default()["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] = [name]
        return app.openapi_schema

    return openapi


def _field_name(location) -> str:
    # ("body", "top_p") → "top_p"; ("body", 15), a JSON syntax error at character 15 → "body";
    # ("body", "messages", 0, "role") → "messages.0.role".
    parts = [str(part) for position, part in enumerate(location)
             if part != "body" and (isinstance(part, str) or position > 1)]
    return ".".join(parts) or "body"


def _reason(item: dict) -> str:
    detail = (item.get("ctx") or {}).get("error")  # e.g. the JSON decoder's message
    return f"{item['msg']}: {detail}" if isinstance(detail, str) else item["msg"]
