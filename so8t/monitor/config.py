"""MonitorConfig: how often the monitor samples and flushes, how much it keeps, and when it alerts."""

from dataclasses import dataclass

from ..errors import ConfigValueError


@dataclass(frozen=True)
class MonitorConfig:
    """interval: sample every ``interval`` optimizer steps (and the first step); 1 samples every step.
    flush_every: fsync metrics.jsonl and rewrite the time series and plots every ``flush_every`` samples
        (also at checkpoint saves and at the end). Each sample reaches the OS when recorded anyway.
    buffer_size: samples kept in memory (and in timeseries.*); metrics.jsonl keeps all of them.
    residual_threshold: alert when a layer's ‖RᵀR − I‖_F exceeds it.
    dead_gradient_samples: alert when a trainable group's gradient is exactly 0 this many samples in a row.
    gate_saturation: alert when a layer's σ(α) exceeds it.
    stop_on_nonfinite: stop training (after the current step) at the first non-finite value.
    plots: draw plots/*.png (matplotlib) at each flush.
    directory: where the files go; default ``<output_dir>/monitoring``.
    layers: in a model without gates (a baseline run), the decoder layers whose outputs are measured;
        default 1 … L−2, where the gates would go. A gated model measures its gated layers.
    """

    interval: int = 10
    flush_every: int = 10
    buffer_size: int = 1000
    residual_threshold: float = 1e-4
    dead_gradient_samples: int = 3
    gate_saturation: float = 0.99
    stop_on_nonfinite: bool = False
    plots: bool = True
    directory: str | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("interval", "flush_every", "buffer_size", "dead_gradient_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigValueError("MonitorConfig.", name, value, "must be an integer ≥ 1")
        if not self.residual_threshold > 0:
            raise ConfigValueError("MonitorConfig.", "residual_threshold", self.residual_threshold, "must be > 0")
        if not 0 < self.gate_saturation < 1:
            raise ConfigValueError("MonitorConfig.", "gate_saturation", self.gate_saturation, "must be in (0, 1)")
