"""α warmup: for the first W optimizer steps α follows a schedule from α₀ to logit(target) and is not
trained; from step W on it is an ordinary trainable parameter that nothing overwrites.

For a custom loop: call ``apply_alpha_schedule(handle, optimizer_steps_done)`` before each optimizer
step's first forward, and drop α's (zero) gradient before ``optimizer.step()`` while
``handle.bank.alpha_frozen`` is set, as ``AlphaAnnealingCallback`` does for the HF Trainer.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from .config import SO8TConfig
from .placement import SO8THandle

logger = logging.getLogger(__name__)

SIGMOID_STEEPNESS = 10.0  # the sigmoid schedule spends ~90% of its change in the middle 40% of warmup


def logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def _schedule_fraction(progress: float, schedule: str) -> float:
    """How far along [α₀, α_target] α is at ``progress`` ∈ [0, 1] of warmup (0 → 0, 1 → 1)."""
    if schedule == "linear":
        return progress
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    # Logistic curve, rescaled so that it starts at exactly 0 and ends at exactly 1.
    low = 1.0 / (1.0 + math.exp(SIGMOID_STEEPNESS / 2))
    value = 1.0 / (1.0 + math.exp(-SIGMOID_STEEPNESS * (progress - 0.5)))
    return (value - low) / (1.0 - 2.0 * low)


def alpha_at_step(step: int, config: SO8TConfig) -> float:
    """α after ``step`` optimizer steps: the schedule during warmup, logit(target) from step W on."""
    target = logit(config.alpha_target)
    if step >= config.warmup_steps:
        return target
    fraction = _schedule_fraction(step / config.warmup_steps, config.schedule)
    return config.alpha_init + (target - config.alpha_init) * fraction


def short_warmup_warning(max_steps: int, config: SO8TConfig) -> str | None:
    """What a run that ends before its α warmup does should be told before it starts."""
    if not 0 < max_steps < config.warmup_steps:
        return None
    reached = 1.0 / (1.0 + math.exp(-alpha_at_step(max_steps, config)))
    return (f"so8t: training ends at step {max_steps}, before the α warmup does (step {config.warmup_steps}): "
            f"σ(α) will reach {reached:.3g}, not the target {config.alpha_target:g} (train longer or shorten "
            "the warmup, --warmup-steps)")


def apply_alpha_schedule(handle: SO8THandle, optimizer_steps_done: int) -> None:
    """Sets α for the coming optimizer step: the schedule's value up to step W, and frozen before it.

    After step W, α is left alone (a resumed run keeps its trained α).
    """
    config = handle.config
    if optimizer_steps_done <= config.warmup_steps:
        with torch.no_grad():
            handle.alpha.fill_(alpha_at_step(optimizer_steps_done, config))
    handle.bank.alpha_frozen = optimizer_steps_done < config.warmup_steps


class AlphaAnnealingCallback(TrainerCallback):
    """Runs the α schedule in an HF Trainer, counting optimizer steps (``state.global_step``), so gradient
    accumulation and resumed runs are handled.

    While frozen, α's gradient is exactly 0 (see ``SO8TGateBank.gate_logits``) and is dropped before the
    optimizer step: the optimizer then skips α entirely (no weight decay, no Adam state), so the first
    trained step after warmup starts Adam from fresh moments instead of from W steps of zeros.
    """

    def __init__(self, handle: SO8THandle):
        self.handle = handle

    def on_train_begin(self, args, state, control, **kwargs):
        apply_alpha_schedule(self.handle, state.global_step)
        warning = short_warmup_warning(state.max_steps, self.handle.config)
        if warning and state.is_world_process_zero:
            logger.warning(warning)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.handle.bank.alpha_frozen:
            self.handle.alpha.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        apply_alpha_schedule(self.handle, state.global_step)
