"""summary.json: samples recorded, the final sample, the extremes of every metric over the whole run,
the alerts raised, and the final and lowest training and eval losses. Extremes accumulate sample by sample, so the summary covers the whole run while
memory holds only the ring buffer."""

import json
import math
import os
from pathlib import Path

import numpy as np

from .export import partial_name
from .losses import Losses
from .schema import METRICS, SCALAR, STEP, RunInfo


class RunningExtremes:
    """Per metric and column, min and max over every sample seen (NaN ignored, as long as one is finite)."""

    def __init__(self):
        self.count = 0
        self.first_step = None
        self.last_step = None
        self.low: dict[str, np.ndarray] = {}
        self.high: dict[str, np.ndarray] = {}

    def add(self, sample: dict) -> None:
        self.count += 1
        self.first_step = sample[STEP] if self.first_step is None else self.first_step
        self.last_step = sample[STEP]
        for metric in METRICS:
            value = np.atleast_1d(np.asarray(sample[metric.name], dtype=np.float64))
            self.low[metric.name] = np.fmin(self.low.get(metric.name, value), value)
            self.high[metric.name] = np.fmax(self.high.get(metric.name, value), value)


def build_summary(
    info: RunInfo, extremes: RunningExtremes, final: dict | None, alerts: list[dict], losses: Losses | None = None,
) -> dict:
    def per_axis(metric, values) -> dict | float | None:
        values = np.atleast_1d(values)
        if metric.axis == SCALAR:
            return _json_number(values[0])
        return {label: _json_number(v) for label, v in zip(info.labels(metric), values)}

    summary = {
        "samples_recorded": extremes.count,
        "first_step": extremes.first_step,
        "last_step": extremes.last_step,
        "run": info.to_json(),
        "alerts": alerts,
        "losses": losses.summary() if losses is not None else {},
        "final": None,
        "extremes": {},
    }
    if final is not None:
        summary["final"] = {STEP: final[STEP]} | {m.name: per_axis(m, final[m.name]) for m in METRICS}
    if extremes.count:
        summary["extremes"] = {
            m.name: {"min": per_axis(m, extremes.low[m.name]), "max": per_axis(m, extremes.high[m.name])}
            for m in METRICS
        }
    return summary


def _json_number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_summary(path: Path, summary: dict) -> None:
    partial = Path(path).with_name(partial_name(Path(path).name))
    partial.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
