"""The HF engine's decoding loop: a batch of prompts, left-padded (the model is decoder-only: every row's
next token sits in the last column), decoded step by step over one KV cache, each row with its own
sampling parameters and stop strings. A row that finishes (EOS, a stop string, its token limit) or is
cancelled leaves the batch and the cache at the next step, and its Completion goes out at once.

With temperature 0 a row's tokens are those it gets alone (tests compare with Hugging Face's
``generate`` on the single prompt). Not thread-safe (the model, the tokenizer and torch's RNG are
shared): the engine runs it on its one model thread.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable

import torch

from so8t_kernels.logit_stats import merge_partials

from ..thinking import partial_tail
from .base import CANCELLED, LENGTH, STOP, Completion, EngineRequest, LogitStats, TextDelta
from .sampling import next_tokens

# What decoding shows for a UTF-8 character whose bytes are not all generated yet: one, however many of
# its bytes are in (maximal-subpart replacement); the next token may complete it into another character.
REPLACEMENT = "\ufffd"


def step_partials(logits: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits → [rows, 6] float64 (finite count, mean, M2, min, max, non-finite count), the
    finite entries' moments of each row (mean and M2 0, min +inf, max -inf where none is finite): the
    partials so8t_kernels.logit_stats merges, one per step, so nothing vocab-sized stays per row."""
    values = logits.double()
    finite = torch.isfinite(values)
    count = finite.sum(-1).double()
    mean = torch.where(finite, values, 0).sum(-1) / count.clamp(min=1)
    centered = torch.where(finite, values - mean[:, None], 0)
    low = torch.where(finite, values, math.inf).amin(-1)
    high = torch.where(finite, values, -math.inf).amax(-1)
    return torch.stack([count, mean, (centered * centered).sum(-1), low, high, values.shape[-1] - count], dim=-1)


class Row:
    """One request's progress through a batch. ``emit`` receives its TextDeltas (when ``deltas``) and
    its Completion, on the model thread."""

    def __init__(self, request: EngineRequest, emit: Callable[[object], None], deltas: bool):
        self.request = request
        self.emit = emit
        self.deltas = deltas
        self.cancelled = threading.Event()
        self.ids: list[int] = []  # generated, EOS included
        self.partials: list[list[float]] = []  # step_partials of each step: 48 bytes a step
        self.text = ""
        self.sent = ""  # the text its TextDeltas added up to
        self.finish_reason: str | None = None


class BatchDecoder:
    def __init__(self, model, tokenizer, sigma_alpha: dict[int, float]):
        from ...data.dataset import THINK_CLOSE, THINK_OPEN

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sigma_alpha = sigma_alpha
        thinking_tags = set(tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])) - {tokenizer.unk_token_id}
        # Decoding keeps the thinking tags even where they are special tokens; every other special
        # token (EOS, padding, chat markers) goes.
        self.dropped_ids = set(tokenizer.all_special_ids) - thinking_tags
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are used: the prefill's [batch, prompt width, vocab] is not
        # computed where the model can skip it.
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> None:
        """Decodes ``rows`` together; each row's Completion is emitted when it finishes."""
        live = []
        for row in rows:
            if row.cancelled.is_set():  # cancelled while it waited
                row.finish_reason = CANCELLED
                self._complete(row)
            else:
                live.append(row)
        if live:
            self._decode(live)

    def _decode(self, rows: list[Row]) -> None:
        from transformers import DynamicCache

        device = self.device
        width = max(len(row.request.prompt.ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = row.request.prompt.ids
            input_ids[index, width - len(ids):] = torch.tensor(ids)
            attention_mask[index, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        while True:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{self.cache_argument: cache}, **self.last_logits_only
                                ).logits[:, -1, :]
            tokens = next_tokens(logits, [row.request.sampling.temperature for row in rows],
                                 [row.request.sampling.top_p for row in rows]).tolist()
            partials = step_partials(logits).tolist()
            del logits  # not alive during the next step's forward
            for row, token, partial in zip(rows, tokens, partials):
                row.partials.append(partial)
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

    def _advance(self, row: Row, token: int) -> None:
        stops = row.request.sampling.stop
        if stops or row.deltas:
            row.text = self.decode_text(row.ids)
            cut = min((at for at in (row.text.find(stop) for stop in stops) if at != -1), default=-1)
            if cut != -1:
                row.text = row.text[:cut]
                row.finish_reason = STOP
        if row.finish_reason is None:
            if token in self.eos_ids:
                row.finish_reason = STOP
            elif len(row.ids) >= row.request.sampling.max_new_tokens:
                row.finish_reason = LENGTH
            elif row.cancelled.is_set():
                row.finish_reason = CANCELLED
        if row.finish_reason is not None:
            self._complete(row)
        elif row.deltas:
            complete_characters = row.text.removesuffix(REPLACEMENT)
            self._send(row, complete_characters[:len(complete_characters) - partial_tail(complete_characters, stops)])

    def _send(self, row: Row, text: str) -> None:
        if len(text) > len(row.sent) and text.startswith(row.sent):
            row.emit(TextDelta(text[len(row.sent):]))
            row.sent = text

    def _complete(self, row: Row) -> None:
        text = row.text if row.request.sampling.stop or row.deltas else self.decode_text(row.ids)
        if row.deltas and row.finish_reason != CANCELLED:
            self._send(row, text)
        stats = None
        if row.partials:
            mean, std, low, high, nonfinite = merge_partials(torch.tensor(row.partials, dtype=torch.float64)).tolist()
            stats = LogitStats(mean, std, low, high, int(nonfinite))
        row.emit(Completion(text=text, prompt_tokens=len(row.request.prompt.ids), new_tokens=len(row.ids),
                            finish_reason=row.finish_reason, logit_stats=stats, sigma_alpha=self.sigma_alpha))

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([token for token in ids if token not in self.dropped_ids],
                                     skip_special_tokens=False)
