"""SO8TConfig: which decoder layers get a gate, how the gates start, and how α is annealed."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigValueError, SO8TError

ALL_INTERMEDIATE = "all_intermediate"
SCHEDULES = ("linear", "cosine", "sigmoid")


@dataclass
class SO8TConfig:
    """Gate placement and annealing. Gate parameters are always fp32.

    layers: ``"all_intermediate"`` (decoder layers 1 … L−2, 0-based) or explicit 0-based indices.
    alpha_init: α at step 0 (σ(−5) ≈ 0.0067: the gates start almost closed).
    alpha_target: the gate activation σ(α) reached at the end of warmup, in (0, 1).
    warmup_steps: optimizer steps during which α follows the schedule and is not trained.
    schedule: the shape of α(step) during warmup: ``linear`` (in logit space), ``cosine``, ``sigmoid``.
    theta_init_std: std of the initial so(8) parameters; 0 makes every R exactly I, so attaching the
        gates leaves the model's outputs unchanged until training moves θ.
    """

    layers: str | list[int] = ALL_INTERMEDIATE
    alpha_init: float = -5.0
    alpha_target: float = 0.1
    warmup_steps: int = 10
    schedule: str = "linear"
    theta_init_std: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != ALL_INTERMEDIATE:
                raise ConfigValueError("", "layers", self.layers,
                                       f"expected {ALL_INTERMEDIATE!r} or a list of layer indices")
        else:
            self.layers = list(self.layers)
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigValueError("", "layers", self.layers, "expected a non-empty list of integer layer indices")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigValueError("", "layers", self.layers, "each layer can be gated once")
        if not 0.0 < self.alpha_target < 1.0:
            raise ConfigValueError("", "alpha_target", self.alpha_target,
                                   "the target gate activation must be in (0, 1)")
        if not math.isfinite(self.alpha_init):
            raise ConfigValueError("", "alpha_init", self.alpha_init, "must be finite")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigValueError("", "warmup_steps", self.warmup_steps, "must be an integer ≥ 0")
        if self.schedule not in SCHEDULES:
            raise ConfigValueError("", "schedule", self.schedule, f"expected one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.theta_init_std) and self.theta_init_std >= 0):
            raise ConfigValueError("", "theta_init_std", self.theta_init_std, "must be ≥ 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SO8TConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SO8TError(f"unknown SO8TConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SO8TConfig:
        return cls.from_dict(json.loads(text))
