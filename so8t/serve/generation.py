"""Text generation: prompts → completion texts (thinking tags kept), logit statistics, gates, batched.

A batch of prompts is left-padded (the model is decoder-only: every row's next token sits in the last
column) and decoded step by step over one KV cache, each row with its own max_new_tokens, temperature,
top-p and stop strings; a finished or cancelled row leaves the batch (and the cache) at the next step.
With temperature 0 a row's completion is the one it gets alone (tests compare with Hugging Face's
``generate`` on the single prompt).

Not thread-safe (the model, the tokenizer and torch's RNG are shared): the server runs every call on
its one model thread (scheduler.py).
"""

from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data.dataset import THINK_CLOSE, THINK_OPEN, render_prompt
from ..gates.placement import SO8THandle
from ..models.inference import load_for_inference
from .sampling import next_tokens

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a row finished


class ContextOverflow(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context; ``field`` is what to change."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the completion ends before the first of these (not included)
    # The completion so far, after each step (model thread), less a tail that may be the start of a stop
    # string (only ever a prefix of the final text).
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Generation:
    text: str  # the decoded completion, special tokens dropped except the thinking tags
    new_tokens: int
    logit_mean: float  # over every generated step's full logit vector
    logit_std: float
    logit_min: float
    logit_max: float
    logit_nonfinite: int
    sigma_alpha: dict[int, float]  # gated layer index → σ(α)
    finish_reason: str = LENGTH  # STOP (EOS or a stop string), LENGTH or CANCELLED


def step_partials(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits → [rows, 6] float64 (finite count, mean, M2, min, max, non-finite count), the
    finite entries' moments of each row (mean and M2 0, min +inf, max -inf where none is finite)."""
    values = logits.double()
    finite = torch.isfinite(values)
    count = finite.sum(-1).double()
    mean = torch.where(finite, values, 0).sum(-1) / count.clamp(min=1)
    centered = torch.where(finite, values - mean[:, None], 0)
    low = torch.where(finite, values, math.inf).amin(-1)
    high = torch.where(finite, values, -math.inf).amax(-1)
    return torch.stack([count, mean, (centered * centered).sum(-1), low, high, values.shape[-1] - count], dim=-1)


class RunningLogitStats:
    """Mean, population std, min and max of the finite logits and the non-finite count, over every step
    merged so far: O(1) memory per row (storing the steps' logits was 16 rows × 2048 steps × 49,152 vocab
    × 4 bytes ≈ 6.4 GB). Steps merge exactly in float64 (Chan et al. 1979)."""

    def __init__(self):
        self.count = self.mean = self.m2 = 0.0
        self.low, self.high = math.inf, -math.inf
        self.nonfinite = 0

    def add(self, partial: list[float]) -> None:
        count, mean, m2, low, high, nonfinite = partial
        self.nonfinite += int(nonfinite)
        self.low, self.high = min(self.low, low), max(self.high, high)
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def result(self) -> tuple[float, float, float, float, int]:
        """(mean, std, min, max, non-finite), rounded to float32 as so8t_kernels.logit_stats reports them;
        NaN statistics where no logit was finite."""
        if self.count == 0:
            return math.nan, math.nan, math.nan, math.nan, self.nonfinite
        stats = torch.tensor([self.mean, math.sqrt(self.m2 / self.count), self.low, self.high],
                             dtype=torch.float32).tolist()
        return (*stats, self.nonfinite)


class _Row:
    """One request's progress through a batch."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.ids: list[int] = []  # generated, EOS included
        self.stats = RunningLogitStats()  # of each step's raw logits
        self.text = ""
        self.finish_reason: str | None = None


class TextGenerator:
    def __init__(self, model, tokenizer, handle: SO8THandle | None, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.handle = handle
        self.name = name
        self.context = getattr(model.config, "max_position_embeddings", None)
        thinking_tags = set(tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])) - {tokenizer.unk_token_id}
        # Decoding keeps the thinking tags even where they are special tokens; every other special
        # token (EOS, padding, chat markers) goes.
        self._dropped_ids = set(tokenizer.all_special_ids) - thinking_tags
        self._pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self._eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are used: the prefill's [batch, prompt width, vocab] is not
        # computed where the model can skip it.
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str | list[dict], max_new_tokens: int) -> list[int]:
        """The prompt (text, or chat messages) as the model saw it in training (so8t.data.dataset.render_prompt),
        checked against the context."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=True)["input_ids"]
        length = len(ids)
        if self.context is not None and length + max_new_tokens > self.context:
            if length >= self.context:
                raise ContextOverflow("prompt", f"the prompt is {length} tokens; the model reads at most {self.context}")
            raise ContextOverflow(
                "max_new_tokens",
                f"the prompt is {length} tokens, so at most {self.context - length} new tokens fit the model's "
                f"context of {self.context}",
            )
        return ids

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> Generation:
        """One prompt alone (a batch of one)."""
        request = GenerationRequest(self.encode(prompt, max_new_tokens), max_new_tokens, temperature, top_p)
        return self.generate_batch([request])[0]

    @torch.inference_mode()
    def generate_batch(self, requests: list[GenerationRequest]) -> list[Generation]:
        rows = [_Row(request) for request in requests]
        live = [row for row in rows if not row.request.cancelled.is_set()]
        for row in rows:
            if row not in live:
                row.finish_reason = CANCELLED
        if live:
            self._decode(live)
        gates = self.sigma_alpha()
        return [self._result(row, gates) for row in rows]

    def _decode(self, rows: list[_Row]) -> None:
        from transformers import DynamicCache

        device = self.device
        width = max(len(row.request.input_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = row.request.input_ids
            input_ids[index, width - len(ids):] = torch.tensor(ids)
            attention_mask[index, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        while True:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{self._cache_argument: cache}, **self._last_logits_only
                                ).logits[:, -1, :]
            tokens = next_tokens(logits, [row.request.temperature for row in rows],
                                 [row.request.top_p for row in rows]).tolist()
            partials = step_partials(logits).tolist()
            del logits  # not alive during the next step's forward
            for row, token, partial in zip(rows, tokens, partials):
                row.stats.add(partial)
                row.ids.append(token)
                self._advance(row, token)
            keep = [index for index, row in enumerate(rows) if row.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch and the cache
                selected = torch.tensor(keep, device=device)
                cache.batch_select_indices(selected)
                attention_mask, position_ids = attention_mask[selected], position_ids[selected]
                rows, tokens = [rows[index] for index in keep], [tokens[index] for index in keep]
            input_ids = torch.tensor(tokens, device=device).unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
            position_ids = position_ids[:, -1:] + 1

    def _advance(self, row: _Row, token: int) -> None:
        request = row.request
        if request.stop or request.on_text is not None:
            row.text = self._decode_text(row.ids)
            cut = min((at for at in (row.text.find(stop) for stop in request.stop) if at != -1), default=-1)
            if cut != -1:
                row.text = row.text[:cut]
                row.finish_reason = STOP
        if row.finish_reason is None:
            if token in self._eos_ids:
                row.finish_reason = STOP
            elif len(row.ids) >= request.max_new_tokens:
                row.finish_reason = LENGTH
            elif request.cancelled.is_set():
                row.finish_reason = CANCELLED
        if request.on_text is not None and row.finish_reason != CANCELLED:
            final = row.finish_reason is not None
            request.on_text(row.text if final else _without_partial_stop(row.text, request.stop))

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([token for token in ids if token not in self._dropped_ids],
                                     skip_special_tokens=False)

    def _result(self, row: _Row, gates: dict[int, float]) -> Generation:
        mean, std, low, high, nonfinite = row.stats.result()  # NaN when cancelled before its first step
        text = row.text if row.request.stop else self._decode_text(row.ids)
        return Generation(text=text, new_tokens=len(row.ids), logit_mean=mean, logit_std=std, logit_min=low,
                          logit_max=high, logit_nonfinite=nonfinite, sigma_alpha=gates,
                          finish_reason=row.finish_reason)

    def sigma_alpha(self) -> dict[int, float]:
        if self.handle is None:
            return {}
        gates = torch.sigmoid(self.handle.alpha.detach().float()).tolist()
        return dict(zip(self.handle.layer_indices, gates))


def _without_partial_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` less its longest tail that a stop string starts with ("Hello world E" for stop "END")."""
    held = max((length for stop in stops for length in range(1, len(stop)) if text.endswith(stop[:length])),
               default=0)
    return text[:len(text) - held]


def load_generator(model: str | None = None, adapter: str | None = None) -> TextGenerator:
    """The generator of ``--model`` and ``--adapter`` (see so8t.models.inference)."""
    loaded = load_for_inference(model, adapter)
    return TextGenerator(loaded.model, loaded.tokenizer, loaded.handle, loaded.name)
