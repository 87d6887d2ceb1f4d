"""What one monitor sample holds: the metric names, what each is indexed by, and what it means.

A metric is one value per gated layer (``layer``; in a run without gates, per measured layer), one per
LoRA group (``lora``), or one value (``scalar``). Training and eval losses, which the Trainer logs on its
own schedule, are not sample metrics: see ``losses``. Files, plots, alerts and the report all read this table; nothing here imports torch.
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
    label: str  # the one short name everything shows it under (report columns, plots, so8t train)
    gates_only: bool = False  # NaN in a run without gates (a baseline)


METRICS = (
    Metric("alpha", LAYER, "gate logit α", "α", True),
    Metric("gate", LAYER, "gate activation σ(α)", "σ(α)", True),
    Metric("ortho_residual_max", LAYER, "max over blocks of ‖RᵀR − I‖_F", "max ‖RᵀR−I‖", True),
    Metric("ortho_residual_mean", LAYER, "mean over blocks of ‖RᵀR − I‖_F", "mean ‖RᵀR−I‖", True),
    Metric("theta_norm_mean", LAYER, "mean over blocks of ‖θ_b‖₂", "mean ‖θ_b‖", True),
    Metric("theta_norm_max", LAYER, "max over blocks of ‖θ_b‖₂", "max ‖θ_b‖", True),
    Metric("rotation_dist_mean", LAYER, "mean over blocks of ‖R_b − I‖_F", "mean ‖R_b−I‖", True),
    # Without gates: the same statistics of the decoder layer's output, where the gate would be.
    Metric("act_rms", LAYER, "rms of the finite gate outputs", "act rms"),
    Metric("act_max_abs", LAYER, "max |y| of the finite gate outputs", "act max|y|"),
    Metric("act_nonfinite", LAYER, "count of non-finite gate outputs", "act non-finite"),
    Metric("param_nonfinite", LAYER, "count of non-finite θ and α entries", "θ,α non-finite", True),
    # Gradients as the optimizer sees them (after clipping); NaN while the parameter is frozen, 0 when it
    # is trainable but received no gradient.
    Metric("grad_theta", LAYER, "‖∂L/∂θ‖₂ of the layer", "‖∂L/∂θ‖", True),
    Metric("grad_alpha", LAYER, "|∂L/∂α| of the layer", "|∂L/∂α|", True),
    Metric("grad_lora", LORA, "‖∂L/∂W‖₂ over the LoRA tensors of the group", "LoRA ‖∂L/∂W‖"),
    Metric("grad_nonfinite", SCALAR, "count of trainable gradient groups with a non-finite norm", "∇ non-finite"),
    Metric("lora_param_nonfinite", SCALAR, "count of LoRA tensors holding a non-finite value", "LoRA non-finite"),
    Metric("logit_mean", SCALAR, "mean of the finite output logits", "logit mean"),
    Metric("logit_std", SCALAR, "population std of the finite output logits", "logit std"),
    Metric("logit_min", SCALAR, "min of the finite output logits", "logit min"),
    Metric("logit_max", SCALAR, "max of the finite output logits", "logit max"),
    Metric("logit_nonfinite", SCALAR, "count of non-finite output logits", "logits non-finite"),
    # From the fused loss (so8t train's default for causal LMs) only: NaN with the model's own loss.
    Metric("entropy", SCALAR, "mean over the predicted tokens of the softmax entropy, in nats", "entropy"),
    Metric("top1_accuracy", SCALAR, "fraction of the predicted tokens whose label has the largest logit",
           "top-1 accuracy"),
)
METRIC = {metric.name: metric for metric in METRICS}
# θ_b and R_b: what the labels' subscript means.
BLOCK_NOTE = "θ_b, R_b: one 8-wide block of a layer's hidden vector; max/mean over the layer's blocks"

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
    # False: a run without gates (a baseline); ``layers`` are then where its activations were measured.
    gated: bool = True

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
            "residual_threshold": self.residual_threshold, "world_size": self.world_size, "gated": self.gated,
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
            gated=bool(data.get("gated", True)),
        )


def format_layers(layers) -> str:
    """``1 … 4`` for a contiguous run of more than two layers, else the list: ``1, 3``."""
    layers = list(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]} … {layers[-1]}"
    return ", ".join(str(layer) for layer in layers)
