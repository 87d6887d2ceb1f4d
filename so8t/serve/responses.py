"""What both APIs build from a request's outcome: error responses (with the request id, the refusal's outcome
recorded for the audit row) and the ``safety`` and ``monitor`` objects of a response body."""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import JSONResponse

from ..judge.judge import Verdict
from .errors import ApiError, error_body
from .generation import Generation
from .ledger import STATE_REQUEST_ID
from .schemas import Monitor, Safety
from .service import Refusal, Service


def refuse(request: Request, record, refusal: Refusal) -> JSONResponse:
    """The error response of a Refusal, with its outcome in the audit record."""
    Service.finish_record(request, record, refusal.outcome)
    return error_response(request, refusal.error, refusal.headers)


def error_response(request: Request, error: ApiError, headers: dict | None = None) -> JSONResponse:
    request_id = request.scope.get("state", {}).get(STATE_REQUEST_ID)
    return JSONResponse(error_body(request.scope["path"], request_id, error), status_code=error.status,
                        headers=headers)


def safety_of(verdict: Verdict | None) -> Safety | None:
    if verdict is None:
        return None
    return Safety(label=verdict.label, confidence=verdict.confidence, predicted=verdict.predicted, reason=verdict.reason)


def monitor_of(generation: Generation) -> Monitor:
    return Monitor(
        generated_tokens=generation.new_tokens, logit_mean=_finite(generation.logit_mean),
        logit_std=_finite(generation.logit_std), logit_min=_finite(generation.logit_min),
        logit_max=_finite(generation.logit_max), logit_nonfinite=generation.logit_nonfinite,
        sigma_alpha={str(layer): gate for layer, gate in generation.sigma_alpha.items()},
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN or inf
