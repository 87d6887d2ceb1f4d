"""What one monitor sample holds: the metric names, what each is indexed by, and what it means.

A metric is one value per gated layer (``layer``), one per LoRA group (``lora``), or one value
(``scalar``). Files, plots, alerts and the report all read this table; nothing here imports torch.
"""

from dataclasses import dataclass

LAYER = "layer"
LORA = "lora"
SCALAR = "scalar"


@dataclass(frozen=True)
class Metric:
    name: str
    axis: str
    description: str


METRICS = (
    Metric("alpha", LAYER, "gate logit α"),
    Metric("gate", LAYER, "gate activation σ(α)"),
    Metric("ortho_residual_max", LAYER, "max over blocks of ‖RᵀR − I‖_F"),
    Metric("ortho_residual_mean", LAYER, "mean over blocks of ‖RᵀR − I‖_F"),
    Metric("theta_norm_mean", LAYER, "mean over blocks of ‖θ_b‖₂"),
    Metric("theta_norm_max", LAYER, "max over blocks of ‖θ_b‖₂"),
    Metric("rotation_dist_mean", LAYER, "mean over blocks of ‖R_b − I‖_F"),
    Metric("act_rms", LAYER, "rms of the finite gate outputs"),
    Metric("act_max_abs", LAYER, "max |y| of the finite gate outputs"),
    Metric("act_nonfinite", LAYER, "count of non-finite gate outputs"),
    Metric("param_nonfinite", LAYER, "count of non-finite θ and α entries"),
    # Gradients as the optimizer sees them (after clipping); NaN while the parameter is frozen, 0 when it
    # is trainable but received no gradient.
    Metric("grad_theta", LAYER, "‖∂L/∂θ‖₂ of the layer"),
    Metric("grad_alpha", LAYER, "|∂L/∂α| of the layer"),
    Metric("grad_lora", LORA, "‖∂L/∂W‖₂ over the LoRA tensors of the group"),
    Metric("grad_nonfinite", SCALAR, "count of trainable gradient groups with a non-finite norm"),
    Metric("lora_param_nonfinite", SCALAR, "count of LoRA tensors holding a non-finite value"),
    Metric("logit_mean", SCALAR, "mean of the finite output logits"),
    Metric("logit_std", SCALAR, "population std of the finite output logits"),
    Metric("logit_min", SCALAR, "min of the finite output logits"),
    Metric("logit_max", SCALAR, "max of the finite output logits"),
    Metric("logit_nonfinite", SCALAR, "count of non-finite output logits"),
)

# Not metrics: where and when a sample was taken.
STEP, EPOCH, TIME = "step", "epoch", "time"


@dataclass(frozen=True)
class RunInfo:
    """What the files need to be read without the model: axis labels and the annealing landmarks."""

    layers: tuple[int, ...]
    lora_groups: tuple[str, ...]
    interval: int
    warmup_steps: int | None = None
    gate_target: float | None = None  # σ(α) at the end of warmup
    residual_threshold: float | None = None
    world_size: int = 1

    def width(self, metric: Metric) -> int:
        return {LAYER: len(self.layers), LORA: len(self.lora_groups), SCALAR: 1}[metric.axis]

    def labels(self, metric: Metric) -> list[str]:
        """Column suffixes: ``L<decoder layer>`` per gated layer, the group name per LoRA group."""
        if metric.axis == LAYER:
            return [f"L{layer}" for layer in self.layers]
        if metric.axis == LORA:
            return list(self.lora_groups)
        return [""]

    def to_json(self) -> dict:
        return {
            "layers": list(self.layers), "lora_groups": list(self.lora_groups), "interval": self.interval,
            "warmup_steps": self.warmup_steps, "gate_target": self.gate_target,
            "residual_threshold": self.residual_threshold, "world_size": self.world_size,
        }

    @classmethod
    def from_json(cls, data: dict) -> "RunInfo":
        return cls(
            layers=tuple(int(layer) for layer in data["layers"]),
            lora_groups=tuple(str(group) for group in data["lora_groups"]),
            interval=int(data["interval"]),
            warmup_steps=data.get("warmup_steps"),
            gate_target=data.get("gate_target"),
            residual_threshold=data.get("residual_threshold"),
            world_size=int(data.get("world_size", 1)),
        )
