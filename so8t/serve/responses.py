"""Error responses of the two APIs, and the ``safety`` and ``monitor`` objects of a response body. Every
error carries the request id.

- ``/think``: ``{"request_id", "error", "detail"?}``, bad input is 422 with
  ``detail = [{"field", "reason"}]``.
- ``/v1/...``: the OpenAI shape ``{"error": {"message", "type", "param", "code"}, "request_id"}``, bad
  input is 400, so OpenAI clients raise their own exception types (``BadRequestError`` …).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from ..judge.judge import Verdict
from .engines.base import Completion
from .schemas import Monitor, Safety

THINK_INVALID_STATUS = 422
OPENAI_INVALID_STATUS = 400
OPENAI_PREFIX = "/v1/"


@dataclass(frozen=True)
class ApiError:
    status: int
    error: str  # short, stable: "invalid request", "server busy", …
    details: tuple[tuple[str, str], ...] = ()  # (field, reason) of bad input
    message: str | None = None  # a sentence for people (the OpenAI body's message)

    @classmethod
    def invalid(cls, path: str, details: list[tuple[str, str]]) -> ApiError:
        """Bad input: 422 on /think, 400 on /v1."""
        status = OPENAI_INVALID_STATUS if path.startswith(OPENAI_PREFIX) else THINK_INVALID_STATUS
        return cls(status, "invalid request", tuple(details))


def error_body(path: str, request_id: str | None, error: ApiError) -> dict:
    if not path.startswith(OPENAI_PREFIX):
        body = {"request_id": request_id, "error": error.error}
        if error.details:
            body["detail"] = [{"field": field, "reason": reason} for field, reason in error.details]
        elif error.message:
            body["detail"] = error.message
        return body
    message = error.message or "; ".join(f"{field}: {reason}" for field, reason in error.details) or error.error
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    param = error.details[0][0] if error.details else None
    return {"error": {"message": message, "type": kind, "param": param, "code": error.error.replace(" ", "_")},
            "request_id": request_id}


def error_bytes(path: str, request_id: str | None, error: ApiError) -> bytes:
    return json.dumps(error_body(path, request_id, error), separators=(",", ":")).encode()


def error_response(path: str, request_id: str, error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, request_id, error), status_code=error.status, headers=headers)


def safety_of(verdict: Verdict | None) -> Safety | None:
    if verdict is None:
        return None
    return Safety(label=verdict.label, confidence=verdict.confidence, predicted=verdict.predicted, reason=verdict.reason)


def monitor_of(completion: Completion) -> Monitor:
    stats = completion.logit_stats
    values = (stats.mean, stats.std, stats.min, stats.max) if stats is not None else (None,) * 4
    mean, std, low, high = (_finite(value) for value in values)
    return Monitor(generated_tokens=completion.new_tokens, logit_mean=mean, logit_std=std, logit_min=low,
                   logit_max=high, logit_nonfinite=stats.nonfinite if stats is not None else None,
                   exact_logit_stats=[f"logit_{name}" for name in stats.exact()] if stats is not None else [],
                   sigma_alpha={str(layer): gate for layer, gate in completion.sigma_alpha.items()})


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # JSON has no NaN or inf
