"""Alerts: a condition checked on every sample; each kind fires once per run, the first time it holds.

An alert is a dict ``{kind, step, message, where}`` (``where``: the layers or groups concerned); the
recorder writes it to metrics.jsonl and logs it, and the summary lists it.
"""

from dataclasses import dataclass

import numpy as np

from .schema import STEP, RunInfo

NONFINITE_LOGITS = "nonfinite_logits"
NONFINITE_ACTIVATIONS = "nonfinite_activations"
NONFINITE_PARAMS = "nonfinite_params"
NONFINITE_GRADS = "nonfinite_grads"
ORTHOGONALITY = "orthogonality_residual"
DEAD_GRADIENT = "dead_gradient"
GATE_SATURATED = "gate_saturated"


@dataclass(frozen=True)
class AlertThresholds:
    residual: float = 1e-4
    # Consecutive samples with an exactly-zero gradient. More than one: LoRA's B starts at zero, so A's
    # gradient is exactly zero on the first step of a healthy run.
    dead_after: int = 3
    gate_saturation: float = 0.99


class AlertChecker:
    def __init__(self, info: RunInfo, thresholds: AlertThresholds, already_raised: set[str] = frozenset()):
        self.info = info
        self.thresholds = thresholds
        self.raised = set(already_raised)
        self._zero_streak: dict[str, int] = {}

    def check(self, sample: dict) -> list[dict]:
        """The alerts this sample raises for the first time."""
        step = sample[STEP]
        layers = [f"L{layer}" for layer in self.info.layers]
        found = []

        def fire(kind: str, message: str, where: list[str]) -> None:
            if kind not in self.raised:
                self.raised.add(kind)
                found.append({"kind": kind, "step": step, "message": message, "where": where})

        if sample["logit_nonfinite"] > 0:
            fire(NONFINITE_LOGITS, f"{int(sample['logit_nonfinite'])} non-finite output logits", [])
        outputs = "gate outputs" if self.info.gated else "layer outputs"
        where = _where(layers, sample["act_nonfinite"] > 0)
        if where:
            fire(NONFINITE_ACTIVATIONS, f"non-finite {outputs} in {', '.join(where)}", where)
        where = _where(layers, sample["param_nonfinite"] > 0)
        if sample["lora_param_nonfinite"] > 0:
            where.append("lora")
        if where:
            fire(NONFINITE_PARAMS, f"non-finite parameters in {', '.join(where)}", where)
        if sample["grad_nonfinite"] > 0:
            fire(NONFINITE_GRADS, f"{int(sample['grad_nonfinite'])} trainable groups with a non-finite gradient", [])
        # NaN counts as infinitely large, except without gates, where there is no residual.
        residual = np.asarray(sample["ortho_residual_max"], dtype=np.float64)
        residual = np.where(np.isnan(residual), np.inf if self.info.gated else 0.0, residual)
        where = _where(layers, residual > self.thresholds.residual)
        if where:
            fire(
                ORTHOGONALITY,
                f"orthogonality residual ‖RᵀR − I‖_F up to {np.max(residual):.3g} > {self.thresholds.residual:g} "
                f"in {', '.join(where)}",
                where,
            )
        where = self._dead_groups(sample)
        if where:
            fire(
                DEAD_GRADIENT,
                f"gradient exactly zero for {self.thresholds.dead_after} samples in a row: {', '.join(where)} "
                "(a bitsandbytes 4-bit model that ran inference before training drops gradients silently)",
                where,
            )
        where = _where(layers, sample["gate"] > self.thresholds.gate_saturation)
        if where:
            fire(GATE_SATURATED, f"σ(α) above {self.thresholds.gate_saturation} in {', '.join(where)}", where)
        return found

    def _gradient_groups(self, sample: dict) -> dict[str, np.ndarray]:
        layers = [f"L{layer}" for layer in self.info.layers]
        # A frozen group (α during warmup) reads NaN, never 0: it is not counted as dead.
        groups = {f"theta/{label}": value for label, value in zip(layers, sample["grad_theta"])}
        groups.update({f"alpha/{label}": value for label, value in zip(layers, sample["grad_alpha"])})
        groups.update({f"lora/{name}": value for name, value in zip(self.info.lora_groups, sample["grad_lora"])})
        return groups

    def _dead_groups(self, sample: dict) -> list[str]:
        dead = []
        for name, norm in self._gradient_groups(sample).items():
            streak = self._zero_streak.get(name, 0) + 1 if norm == 0 else 0
            self._zero_streak[name] = streak
            if streak >= self.thresholds.dead_after:
                dead.append(name)
        return dead


def _where(labels: list[str], mask: np.ndarray) -> list[str]:
    return [label for label, hit in zip(labels, np.asarray(mask)) if hit]
