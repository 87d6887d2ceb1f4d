"""Request and response bodies of the API (pydantic; FastAPI turns them into the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..judge import LABELS
from .thinking import CASES

MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS = 2048

SafetyLabel = Literal[LABELS]
ThinkingCase = Literal[CASES]
Outcome = Literal["answered", "escalated", "denied"]


class ThinkRequest(BaseModel):
    # Unknown fields are an error: a misspelt `max_tokens` must not silently fall back to the default.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="0 decodes greedily")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    return_thinking: bool = False


class Safety(BaseModel):
    label: SafetyLabel  # what the server acted on
    confidence: float  # the judge's probability of its top label
    predicted: SafetyLabel  # the judge's top label; differs from `label` when it failed closed
    reason: Literal["model", "low_confidence", "too_long"]


class Monitor(BaseModel):
    """Logit statistics over every generated step's full logit vector (null when no entry was finite)."""

    generated_tokens: int
    logit_mean: float | None
    logit_std: float | None
    logit_min: float | None
    logit_max: float | None
    logit_nonfinite: int
    sigma_alpha: dict[str, float]  # gated decoder layer (0-based) → σ(α)


class ThinkResponse(BaseModel):
    """``answer`` is null unless the outcome is ``answered``: an escalated or denied prompt is not
    generated at all, so there is no thinking, hash or monitor block either."""

    request_id: str
    outcome: Outcome
    answer: str | None
    thinking_sha256: str | None  # SHA-256 of the UTF-8 thinking text ("" when there was none)
    thinking_parse: ThinkingCase | None
    thinking: str | None = None  # only with return_thinking
    safety: Safety | None = None  # only when a safety model is configured
    monitor: Monitor | None = None  # only when the model generated
    latency_ms: float

    def body(self) -> dict:
        """The JSON body: the optional fields appear only when they apply."""
        optional = ("thinking", "safety", "monitor")
        return {key: value for key, value in self.model_dump().items() if key not in optional or value is not None}
