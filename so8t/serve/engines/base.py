"""What ``so8t serve`` and ``so8t generate`` need from a generation engine, whatever runs the model.

An engine turns a prompt's token ids and ``SamplingParams`` into a completion, streaming first: ``stream``
yields ``TextDelta``s as the text grows, then one ``Completion``. It owns batching, the stop strings and
cancellation; the server owns admission, the safety judge, the thinking parse and the audit row. Several
requests stream at once from one event loop; leaving a stream early (closing it, or cancelling the task
that reads it) cancels its request, whose generation stops at its next token.

The sampling limits and defaults of both commands are here, once. Nothing heavy is imported at the top:
``so8t generate --help`` reads them without torch.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

MAX_NEW_TOKENS = 2048
DEFAULT_NEW_TOKENS = 256
MAX_TEMPERATURE = 2.0
# Below this a temperature decodes greedily: dividing float32 logits by a denormal (1e-39) overflows.
GREEDY_BELOW = 1e-4
API_TEMPERATURE = 0.7  # /think and /v1 without a temperature: varied answers, as chat APIs give
TERMINAL_TEMPERATURE = 0.0  # so8t generate without --temperature: the same answer every time
DEFAULT_TOP_P = 1.0

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a completion ended (STOP: EOS or a stop string)


def sampling_errors(max_new_tokens: int, temperature: float, top_p: float) -> list[tuple[str, str]]:
    """(field, reason) for each value outside the limits (the API's schema states the same limits)."""
    errors = []
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        errors.append(("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}"))
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        errors.append(("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature}"))
    if not 0.0 < top_p <= 1.0:
        errors.append(("top_p", f"must be in (0, 1], got {top_p}"))
    return errors


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    temperature: float = API_TEMPERATURE  # below GREEDY_BELOW (0 included): greedy
    top_p: float = DEFAULT_TOP_P  # nucleus: the smallest set of most likely tokens reaching this mass
    stop: tuple[str, ...] = ()  # the completion ends before the first of these (not included)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class ContextOverflow(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context; ``field`` is what to
    change: "prompt" or "max_new_tokens"."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    opens_thinking: bool  # the chat template ended it with <think>: the completion starts inside a block


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: EncodedPrompt
    sampling: SamplingParams


@dataclass(frozen=True)
class TextDelta:
    """New completion text (thinking tags kept, special tokens dropped). Never a tail that may still turn
    into a stop string or an unfinished UTF-8 character: the deltas add up to the Completion's text."""

    text: str


@dataclass(frozen=True)
class LogitStats:
    """Over every generated step's full logit vector, before temperature and top-p (as
    so8t_kernels.logit_stats defines them); NaN statistics where no entry was finite. None for what the
    engine cannot compute exactly (vLLM returns top logprobs, not logits: only ``max`` is exact there)."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nonfinite: int | None

    def exact(self) -> list[str]:
        """The names of the statistics this engine computed (the others are None)."""
        return [name for name in ("mean", "std", "min", "max", "nonfinite") if getattr(self, name) is not None]


@dataclass(frozen=True)
class Completion:
    text: str  # the decoded completion, cut before a stop string
    prompt_tokens: int
    new_tokens: int  # generated, EOS included
    finish_reason: str  # STOP, LENGTH or CANCELLED
    logit_stats: LogitStats | None  # None where the engine cannot see the logits
    sigma_alpha: dict[int, float] = field(default_factory=dict)  # gated layer → σ(α) of its gate


class Engine(abc.ABC):
    """A loaded model behind an async, streaming interface (see the module docstring)."""

    name: str  # the model name clients send (/v1 ``model``)
    tokenizer: object  # a transformers tokenizer: the chat template, token counts
    context_length: int | None  # prompt + new tokens fit in this; None: unbounded
    gated_layers: list[int]  # decoder layers with an SO(8) gate (0-based)

    def encode(self, prompt: str | list[dict], max_new_tokens: int) -> EncodedPrompt:
        """The prompt (text, or chat messages) as the model saw it in training (the chat template),
        checked against the context; raises ContextOverflow."""
        from ...data.dataset import render_prompt  # imports torch: not at the top (see the docstring)
        from ..thinking import prompt_opens_thinking

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = render_prompt(self.tokenizer, messages)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        context, length = self.context_length, len(ids)
        if context is not None and length + max_new_tokens > context:
            if length >= context:
                raise ContextOverflow("prompt", f"the prompt is {length} tokens; the model reads at most {context}")
            raise ContextOverflow("max_new_tokens", f"the prompt is {length} tokens, so at most {context - length} "
                                                    f"new tokens fit the model's context of {context}")
        return EncodedPrompt(ids, prompt_opens_thinking(text))

    @abc.abstractmethod
    def stream(self, request: EngineRequest) -> AsyncIterator[TextDelta | Completion]:
        """TextDeltas, then the Completion (an async generator; leaving it early cancels the request)."""

    async def generate(self, request: EngineRequest) -> Completion:
        """The Completion alone (cancelling the awaiting task cancels the request)."""
        stream = self.stream(request)
        try:
            async for event in stream:
                if isinstance(event, Completion):
                    return event
        finally:
            await stream.aclose()
        raise RuntimeError(f"the engine ended request {request.request_id} without a completion")

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stops the request's generation at its next token (nothing if it is not running)."""

    async def run_exclusive(self, function: Callable, *args):
        """``function(*args)`` off the event loop, with the engine's compute to itself where that matters
        (the safety judge shares the CPU or GPU with generation). Default: a worker thread."""
        return await asyncio.to_thread(function, *args)

    def shutdown(self) -> None:
        """Finishes what was submitted, then releases the engine's threads or processes."""
