"""so8t.monitor: what the SO(8) gates do while training, recorded cheaply.

callback (HF TrainerCallback) → probe (device reductions) → recorder (metrics.jsonl, ring buffer,
alerts; off the training thread timeseries.* and plots/*.png) and summary.json. The file side
(metrics_log, series, export, plots, summary, report) imports no torch, so ``so8t report`` runs without it.
"""

from .config import MonitorConfig

__all__ = ["MonitorConfig", "SO8TMonitorCallback"]


def __getattr__(name):
    # The callback pulls in torch and transformers; the report must not have to.
    if name == "SO8TMonitorCallback":
        from .callback import SO8TMonitorCallback

        return SO8TMonitorCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
