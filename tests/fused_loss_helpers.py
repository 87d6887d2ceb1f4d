"""Training with and without the fused loss, for tests that compare the two (embedded or real model).

``train_losses(options)`` trains one ``so8t train --task generate`` run in this process and returns the
Trainer's logged training losses, one per optimizer step. ``assert_loss_curves_agree`` compares two.
A real-model test reuses both with ``TrainOptions(model=...)``: the run with the fused loss is
``fused_loss=True`` (the default), the reference ``fused_loss=False`` (``--no-fused-loss``).
"""

import math
from dataclasses import replace

import torch

from so8t.training.finetune import build_training
from so8t.training.options import TrainOptions


def train_losses(options: TrainOptions, output_dir, demo_overrides: dict | None = None) -> list[float]:
    """Trains ``options`` into ``output_dir`` (logging every step) and returns the per-step losses."""
    training = build_training(replace(options, output_dir=str(output_dir)), output_dir, demo_overrides=demo_overrides)
    training.trainer.args.logging_steps = 1
    torch.manual_seed(options.seed)
    training.trainer.train()
    losses = [entry["loss"] for entry in training.trainer.state.log_history if "loss" in entry]
    assert len(losses) == options.max_steps, f"{len(losses)} losses logged for {options.max_steps} steps"
    return losses


def assert_loss_curves_agree(fused: list[float], reference: list[float], rtol: float) -> None:
    """Step by step within ``rtol`` (relative): the two losses are the same function of the same
    parameters, so they differ by fp32 roundings that training may amplify, never by a trend."""
    assert len(fused) == len(reference)
    for step, (a, b) in enumerate(zip(fused, reference), start=1):
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=rtol), f"step {step}: fused {a} vs model's own {b}"
