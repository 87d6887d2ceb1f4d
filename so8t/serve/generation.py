"""Text generation for /think: prompt → completion text (thinking tags kept), logit statistics, gates.

Not thread-safe (the model, the tokenizer and torch's RNG are shared): the server runs every call on
its one model thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from so8t_kernels import logit_stats

from ..dataset import THINK_CLOSE, THINK_OPEN, render_prompt
from ..placement import SO8THandle


class ContextOverflow(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context; ``field`` is what to change."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str, max_new_tokens: int) -> torch.Tensor:
        """The prompt as the model saw it in training (so8t.dataset.render_prompt), checked against the context."""
        text = render_prompt(self.tokenizer, [{"role": "user", "content": prompt}])
        ids = self.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
        length = ids.shape[1]
        if self.context is not None and length + max_new_tokens > self.context:
            if length >= self.context:
                raise ContextOverflow("prompt", f"the prompt is {length} tokens; the model reads at most {self.context}")
            raise ContextOverflow(
                "max_new_tokens",
                f"the prompt is {length} tokens, so at most {self.context - length} new tokens fit the model's "
                f"context of {self.context}",
            )
        return ids

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> Generation:
        input_ids = self.encode(prompt, max_new_tokens).to(self.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        output = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            pad_token_id=self._pad_token_id, output_logits=True, return_dict_in_generate=True, **sampling,
        )
        new_ids = [token for token in output.sequences[0, input_ids.shape[1]:].tolist() if token not in self._dropped_ids]
        # output.logits: the raw logits of each generated step (before temperature and top-p).
        mean, std, low, high, nonfinite = logit_stats(torch.stack(output.logits)).tolist()
        return Generation(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=False),
            new_tokens=len(output.logits),
            logit_mean=mean, logit_std=std, logit_min=low, logit_max=high, logit_nonfinite=int(nonfinite),
            sigma_alpha=self.sigma_alpha(),
        )

    def sigma_alpha(self) -> dict[int, float]:
        if self.handle is None:
            return {}
        gates = torch.sigmoid(self.handle.alpha.detach().float()).tolist()
        return dict(zip(self.handle.layer_indices, gates))
