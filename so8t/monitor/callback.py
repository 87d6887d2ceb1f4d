"""SO8TMonitorCallback: the HF Trainer side of the monitor.

Per sampled optimizer step: the probe is armed at step begin, reads gradients before the optimizer
step, and at step end its flat tensor is reduced across processes and copied to the host once; rank 0
records it (files, alerts), every rank adds a few of its values (``so8t/*``) to the Trainer's log of that step.
"""

import atexit
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import transformers
from transformers import TrainerCallback

from ..errors import SO8TError
from ..gates.config import ALL_INTERMEDIATE
from ..gates.placement import find_decoder_layout, find_so8t_handle, resolve_layer_indices
from .alerts import AlertThresholds
from .config import MonitorConfig
from .probe import SampleProbe, trainable_groups
from .recorder import Recorder
from .reduce import CrossProcessReducer, world_size
from .schema import EPOCH, STEP, TIME, RunInfo

logger = logging.getLogger(__name__)

NONFINITE_COUNTS = ("logit_nonfinite", "act_nonfinite", "param_nonfinite", "lora_param_nonfinite", "grad_nonfinite")


class SO8TMonitorCallback(TrainerCallback):
    """Records what the SO(8) gates do while training; see ``MonitorConfig`` for the options, which can
    also be given as keywords: ``SO8TMonitorCallback(interval=1)``. On a model without gates (a baseline)
    it records the same files and columns: loss, logits, gradients and the outputs of the layers where
    the gates would be; the gate metrics are NaN."""

    def __init__(self, config: MonitorConfig | None = None, **options):
        self.config = replace(config or MonitorConfig(), **options)
        self.recorder: Recorder | None = None
        self.latest: dict | None = None
        self._probe: SampleProbe | None = None
        self._reducer: CrossProcessReducer | None = None
        self._sampling = False
        self._unlogged = False  # the latest sample's scalars have not reached a log yet

    def add_to(self, trainer) -> "SO8TMonitorCallback":
        """Registers the monitor ahead of the reporting callbacks (TensorBoard, W&B, ...) so that the
        ``so8t/*`` scalars it adds to the logs reach them; ``Trainer(callbacks=[...])`` puts it after."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def directory(self, args) -> Path:
        return Path(self.config.directory or Path(args.output_dir) / "monitoring")

    def sampled(self, step: int, max_steps: int | None = None) -> bool:
        """Step 1, every ``interval``-th step, and the last one (a short run still gets its end)."""
        return step == 1 or step % self.config.interval == 0 or step == max_steps

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.close()  # a previous train() in this process that ended in an exception
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
            raise SO8TError("SO8TMonitorCallback reads gradients in on_pre_optimizer_step, which this "
                            f"transformers ({transformers.__version__}) lacks: upgrade transformers")
        handle = find_so8t_handle(model)
        if handle is not None:
            layers = list(handle.layer_indices)
        else:
            layers = resolve_layer_indices(list(self.config.layers or []) or ALL_INTERMEDIATE,
                                           find_decoder_layout(model).num_layers)
        groups = trainable_groups(model, handle)
        self._probe = SampleProbe(model, handle, groups, layers)
        self._reducer = CrossProcessReducer(self._probe.reductions())
        self.latest = None
        self._unlogged = False
        if state.is_world_process_zero:
            annealing = handle.config if handle is not None else None
            info = RunInfo(
                layers=tuple(layers), lora_groups=tuple(groups), interval=self.config.interval,
                warmup_steps=annealing.warmup_steps if annealing else None,
                gate_target=annealing.alpha_target if annealing else None,
                residual_threshold=self.config.residual_threshold, world_size=world_size(), gated=handle is not None,
            )
            thresholds = AlertThresholds(
                self.config.residual_threshold, self.config.dead_gradient_samples, self.config.gate_saturation
            )
            self.recorder = Recorder(
                self.directory(args), info, self.config.buffer_size, self.config.flush_every, thresholds,
                self.config.plots,
            )
            self.recorder.start(state.global_step)
            # An exception out of trainer.train() skips on_train_end: the files are finished at exit.
            atexit.register(self._close_at_exit)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sampling = self._probe is not None and self.sampled(state.global_step + 1, state.max_steps)
        if self._sampling:
            self._probe.begin()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._sampling:
            self._probe.capture()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._sampling:
            return
        self._sampling = False
        values = self._reducer(self._probe.vector()).cpu().numpy()  # the sample's one host sync
        sample = {STEP: state.global_step, EPOCH: state.epoch, TIME: time.time(), **self._probe.to_sample(values)}
        self.latest = sample
        self._unlogged = True
        # The so8t/* scalars go to the Trainer's logs of this step only: have it log here, also between
        # its logging_steps (its loss then too, averaged since the last log).
        control.should_log = True
        if self.recorder is not None:
            self.recorder.add(sample)
        if self.config.stop_on_nonfinite and any(np.any(sample[name] > 0) for name in NONFINITE_COUNTS):
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self.recorder is not None:  # the training loss, or the eval loss after an evaluation
            self.recorder.add_losses(state.global_step, logs)
        # Once per sampled step: an eval log of that step would repeat the same points.
        if not self._unlogged or self.latest[STEP] != state.global_step:
            return
        self._unlogged = False
        scalars = compact_scalars(self.latest)
        logs.update(scalars)
        # The Trainer appends a copy of `logs` to its history before callbacks see them.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_save(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Finishes the files (fsync, time series, plots, summary.json); safe to call more than once."""
        if self._probe is not None:
            self._probe.release()
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            atexit.unregister(self._close_at_exit)
            recorder.finish()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except OSError as error:  # e.g. the failed run's output directory was removed meanwhile
            logger.warning("so8t monitor: could not finish the monitoring files at exit: %s", error)


def compact_scalars(sample: dict) -> dict[str, float]:
    """The few numbers that go to the Trainer's logs (TensorBoard, W&B, trainer_state.json); values
    that are not finite (a frozen α's gradient, say) are left out."""
    scalars = {
        "so8t/alpha_mean": _over_finite(np.mean, sample["alpha"]),
        "so8t/gate_max": _over_finite(np.max, sample["gate"]),
        "so8t/ortho_max": _over_finite(np.max, sample["ortho_residual_max"]),
        "so8t/theta_norm_max": _over_finite(np.max, sample["theta_norm_max"]),
        "so8t/act_rms_max": _over_finite(np.max, sample["act_rms"]),
        "so8t/logit_mean": sample["logit_mean"],
        "so8t/logit_std": sample["logit_std"],
        "so8t/entropy": sample["entropy"],
        "so8t/top1_accuracy": sample["top1_accuracy"],
        "so8t/grad_theta_max": _over_finite(np.max, sample["grad_theta"]),
        "so8t/grad_lora_min": _over_finite(np.min, sample["grad_lora"]),
    }
    return {key: float(value) for key, value in scalars.items() if math.isfinite(value)}


def _over_finite(reduce, values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return reduce(finite) if finite.size else math.nan
