"""Error bodies of the two APIs. Every error carries the request id.

- ``/think``: ``{"request_id", "error", "detail"?}``, bad input is 422 with
  ``detail = [{"field", "reason"}]``.
- ``/v1/...``: the OpenAI shape ``{"error": {"message", "type", "param", "code"}, "request_id"}``, bad
  input is 400, so OpenAI clients raise their own exception types (``BadRequestError`` …).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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
    def invalid(cls, status: int, details: list[tuple[str, str]]) -> ApiError:
        return cls(status, "invalid request", tuple(details))


def invalid_status(path: str) -> int:
    return OPENAI_INVALID_STATUS if path.startswith(OPENAI_PREFIX) else THINK_INVALID_STATUS


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
