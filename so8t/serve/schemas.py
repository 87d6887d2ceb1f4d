"""Request and response bodies of the API (pydantic; FastAPI turns them into the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..judge.judge import LABELS
from .engines.base import (
    API_TEMPERATURE,
    DEFAULT_NEW_TOKENS,
    DEFAULT_TOP_P,
    GREEDY_BELOW,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    SamplingParams,
)
from .thinking import CASES

MAX_PROMPT_CHARS = 16_000
MAX_STOPS = 4


def _integral_float_as_int(value):
    # JSON Schema's "integer" admits 4.0 (a number whose fraction is zero): so does the API. Otherwise
    # types are strict: "5", true and 4.5 are refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS), BeforeValidator(_integral_float_as_int)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE,
                                     description=f"below {GREEDY_BELOW} (0 included) decodes greedily")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]

SafetyLabel = Literal[LABELS]
ThinkingCase = Literal[CASES]
Outcome = Literal["answered", "escalated", "denied"]


class ThinkRequest(BaseModel):
    # Unknown fields are an error: a misspelt `max_tokens` must not silently fall back to the default.
    # Strict: `"max_new_tokens": "5"` or `true` and `"return_thinking": 1` are errors, not coerced.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: NewTokens = DEFAULT_NEW_TOKENS
    temperature: Temperature = API_TEMPERATURE
    top_p: TopP = DEFAULT_TOP_P
    return_thinking: bool = False

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p)


class Safety(BaseModel):
    label: SafetyLabel  # what the server acted on
    confidence: float | None  # the judge's probability of its top label; null when its output was unusable
    predicted: SafetyLabel | None  # the judge's top label; differs from `label` when it failed closed
    reason: Literal["model", "low_confidence", "too_long", "invalid_output"]


class Monitor(BaseModel):
    """Logit statistics over every generated step's full logit vector (null when no entry was finite).
    ``exact_logit_stats`` names those the engine computed: all five on the HF engine, ``logit_max`` alone
    on the vLLM engine (from its top logprobs); the others are null there."""

    generated_tokens: int
    logit_mean: float | None
    logit_std: float | None
    logit_min: float | None
    logit_max: float | None
    logit_nonfinite: int | None
    exact_logit_stats: list[str]
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request that so8t serves; anything else is refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature = API_TEMPERATURE
    top_p: TopP = DEFAULT_TOP_P
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    return_thinking: bool = Field(default=False, description=(
        "so8t: the thinking as `reasoning_content` in the message (or in the streamed deltas)"))

    @property
    def length_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def sampling(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(self.max_completion_tokens or self.max_tokens or DEFAULT_NEW_TOKENS, self.temperature,
                              self.top_p, tuple(stop for stop in stops if stop))
