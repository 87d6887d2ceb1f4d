"""The next token of each row of a batch, each row with its own temperature and top-p (the HF engine's).

Temperatures below GREEDY_BELOW decode greedily: dividing float32 logits by a denormal temperature
(1e-39) overflows to inf and the softmax to NaN. Above it, the logits are shifted by their maximum
before dividing, so the largest is 0 and no temperature in (GREEDY_BELOW, 2] overflows. Top-p keeps
the smallest set of most likely tokens whose probability reaches p (at least one), as Hugging Face's
TopPLogitsWarper does. A row whose logits are not finite falls back to the argmax of its finite ones.
"""

from __future__ import annotations

import torch

from .base import GREEDY_BELOW


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def next_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (rows, vocab) → token ids (rows,)."""
    logits = logits.float()
    finite = torch.nan_to_num(logits, nan=-torch.inf)
    tokens = finite.argmax(dim=-1)
    sampled = [row for row, temperature in enumerate(temperatures) if not is_greedy(temperature)]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    scores = finite[rows]
    usable = torch.isfinite(scores.max(dim=-1).values)  # at least one finite logit
    temperature = torch.tensor([temperatures[row] for row in sampled], device=logits.device).unsqueeze(-1)
    scores = (scores - scores.max(dim=-1, keepdim=True).values.nan_to_num(0.0)) / temperature
    probabilities = torch.softmax(scores, dim=-1)
    top_p = torch.tensor([top_ps[row] for row in sampled], device=logits.device).unsqueeze(-1)
    probabilities = _top_p(probabilities, top_p)
    usable &= torch.isfinite(probabilities).all(dim=-1) & (probabilities.sum(dim=-1) > 0)
    choice = torch.multinomial(torch.where(usable.unsqueeze(-1), probabilities, 1.0), 1, generator=generator)
    tokens[rows] = torch.where(usable, choice.squeeze(-1), tokens[rows])
    return tokens


def _top_p(probabilities: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    ordered, order = probabilities.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # probability of the more likely tokens
    ordered = torch.where(before < top_p, ordered, 0.0)  # the most likely token always stays (before = 0)
    kept = torch.zeros_like(probabilities).scatter(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)
