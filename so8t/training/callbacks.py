"""The Trainer callbacks of a ``so8t train`` run, in the order they must run."""

from __future__ import annotations

from ..gates.annealing import AlphaAnnealingCallback
from ..gates.placement import SO8THandle
from .options import TrainOptions


def build_callbacks(options: TrainOptions, handle: SO8THandle | None) -> list:
    """The monitor (first: it samples the step before anything changes the gates), α annealing, then
    ``options.extra_callbacks``. A run without gates gets no annealing; its monitor records the same
    files without the gate metrics (a baseline to compare with)."""
    callbacks = [AlphaAnnealingCallback(handle)] if handle is not None else []
    if options.monitor is not None:
        from ..monitor import SO8TMonitorCallback

        callbacks.insert(0, SO8TMonitorCallback(options.monitor))
    return callbacks + list(options.extra_callbacks)
