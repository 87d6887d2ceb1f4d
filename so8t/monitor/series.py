"""Samples as arrays: ``[samples, width]`` per per-layer or per-LoRA-group metric, ``[samples]`` per
scalar metric, plus the steps, epochs and wall times. What the writers, plots and summary consume."""

from dataclasses import dataclass, field

import numpy as np

from .metrics_log import MetricsFileError
from .schema import EPOCH, METRICS, SCALAR, STEP, TIME, RunInfo


@dataclass
class Series:
    info: RunInfo
    steps: np.ndarray
    epochs: np.ndarray
    times: np.ndarray
    values: dict[str, np.ndarray]
    # The Trainer's logged losses: ``[n, 2]`` (step, value) per key of ``losses.LOSS_KEYS`` that has any.
    losses: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def empty_arrays(cls, info: RunInfo, length: int) -> "Series":
        values = {}
        for metric in METRICS:
            shape = (length,) if metric.axis == SCALAR else (length, info.width(metric))
            values[metric.name] = np.full(shape, np.nan)
        return cls(info, np.zeros(length, np.int64), np.full(length, np.nan), np.full(length, np.nan), values)

    @classmethod
    def from_samples(cls, info: RunInfo, samples: list[dict], losses: dict[str, np.ndarray] | None = None) -> "Series":
        series = cls.empty_arrays(info, len(samples))
        series.losses = dict(losses or {})
        for row, sample in enumerate(samples):
            series.set_row(row, sample)
        return series

    def set_row(self, row: int, sample: dict) -> None:
        self.steps[row], self.epochs[row], self.times[row] = sample[STEP], sample[EPOCH], sample[TIME]
        for metric in METRICS:
            value = sample[metric.name]
            if metric.axis != SCALAR and len(value) != self.info.width(metric):
                raise MetricsFileError(
                    f"sample at step {sample[STEP]} has {len(value)} values of {metric.name}; the run info "
                    f"says {self.info.width(metric)} ({metric.axis}s): samples from a different model set-up"
                )
            self.values[metric.name][row] = value

    def row(self, row: int) -> dict:
        sample = {STEP: int(self.steps[row]), EPOCH: float(self.epochs[row]), TIME: float(self.times[row])}
        for metric in METRICS:
            value = self.values[metric.name][row]
            sample[metric.name] = float(value) if metric.axis == SCALAR else value.copy()
        return sample

    def columns(self) -> dict[str, np.ndarray]:
        """Wide table: step, epoch, time, then ``<metric>/<label>`` per layer or group, ``<metric>`` per scalar."""
        table = {STEP: self.steps, EPOCH: self.epochs, TIME: self.times}
        for metric in METRICS:
            values = self.values[metric.name]
            if metric.axis == SCALAR:
                table[metric.name] = values
            else:
                for column, label in enumerate(self.info.labels(metric)):
                    table[f"{metric.name}/{label}"] = values[:, column]
        return table
