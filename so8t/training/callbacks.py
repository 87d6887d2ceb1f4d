"""The Trainer callbacks of a ``so8t train`` run, in the order they must run, and its training log."""

from __future__ import annotations

import math
import sys

from transformers import PrinterCallback, ProgressCallback

from ..gates.annealing import AlphaAnnealingCallback
from ..gates.placement import SO8THandle
from ..monitor.schema import STEP
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


def _number(value: float) -> str:
    readable = value == 0 or (math.isfinite(value) and abs(value) >= 1e-3)
    return f"{value:.3g}" if readable else f"{value:.2e}"


def log_line(step: int, max_steps: int, logs: dict, gates: dict[str, float] | None = None) -> str | None:
    """One short line for a log of the Trainer (None for the end-of-training totals): the step, loss,
    learning rate and gradient norm, or the eval loss; then ``gates`` (on the monitor's sampled steps: σ(α)'s
    mean over the gated layers and the largest orthogonality residual ‖RᵀR − I‖_F)."""
    parts = [f"step {step}/{max_steps}"]
    if "eval_loss" in logs:
        parts.append(f"eval loss {logs['eval_loss']:.4f}")
    elif "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
        names = {"learning_rate": "lr", "grad_norm": "grad norm"}
        parts += [f"{label} {_number(logs[key])}" for key, label in names.items() if key in logs]
        parts += [f"{label} {_number(value)}" for label, value in (gates or {}).items()]
    else:
        return None
    return "  ".join(parts)


class TrainingLog(ProgressCallback):
    """The Trainer's progress output, short: one line per log (``log_line``) on stderr; the progress
    bars only when stderr is a terminal (elsewhere they print cursor-movement codes, ``\\x1b[A``, and a
    line per update). The full logs still go to trainer_state.json, the monitor's files and the trackers."""

    def __init__(self, handle: SO8THandle | None = None, monitor=None):
        super().__init__()
        self.handle, self.monitor = handle, monitor
        self.bars = sys.stderr.isatty()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bars:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bars:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.bars:
            super().on_prediction_step(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = log_line(state.global_step, state.max_steps, logs, self._gates(state.global_step, logs))
        if line is None:
            return
        if self.training_bar is not None:
            self.training_bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def _gates(self, step: int, logs: dict) -> dict[str, float] | None:
        """On a step the monitor sampled (it adds the so8t/* values to that step's log only): σ(α)
        averaged over the gated layers (one host read of L scalars) and the largest residual."""
        latest = getattr(self.monitor, "latest", None)
        if self.handle is None or latest is None or latest[STEP] != step or "so8t/ortho_max" not in logs:
            return None
        import torch

        gate_mean = torch.sigmoid(self.handle.alpha.detach().float()).mean().item()
        return {"σ(α) mean": gate_mean, "max residual": logs["so8t/ortho_max"]}


def use_training_log(trainer, handle: SO8THandle | None) -> None:
    """Replaces the Trainer's progress bar or log printer (a ~700-character dict per log) with ``TrainingLog``."""
    from ..monitor import SO8TMonitorCallback

    monitor = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SO8TMonitorCallback)), None)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingLog(handle, monitor))
