"""Training-step time with the monitor against the same training without it (the minimum: ≤ 1.05×), on the demo
of ``so8t train`` (the embedded tiny Phi-3, LoRA, gates on layers 1 … 4, the bundled data).

A timed sample is the mean step time over one whole training run, from the step after warm-up to the
last step: sampled and unsampled steps alike, with the monitor's flushes. Set-up before the first step
and the end-of-training files (summary, final plots) are outside it; so is the background export of
plots and time series, which starts 50 s into a run and then takes at most 2% of the wall time (see
``so8t/monitor/recorder.py``), where these runs last a few seconds. The three configurations take turns
run by run, so that a shared machine's changing load hits each of them alike.
"""

import tempfile
import time
from pathlib import Path

from harness import (
    LOWER_IS_BETTER,
    MINIMUM,
    Context,
    Target,
    TimesReference,
    benchmark,
    interleaved_step_times,
    register_targets,
    summarize,
)

STEPS, WARMUP_STEPS, ROUNDS = 40, 10, 10  # 30 timed steps (3 samples at the default interval) per run
QUICK_STEPS, QUICK_ROUNDS = 30, 3
DEFAULT_INTERVAL = 10  # MonitorConfig.interval
NO_MONITOR, DEFAULT, EVERY_STEP = "no monitor", f"monitor every {DEFAULT_INTERVAL}", "monitor every 1"


def step_clock(first_timed_step: int):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time from the beginning of ``first_timed_step`` to the end of the last step. Registered
        after the monitor, so the monitor's own step-end work is inside."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first_timed_step:
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= first_timed_step:
                self.mean_step_ms = (time.perf_counter() - self.started) * 1e3 / (state.global_step - first_timed_step + 1)

    return StepClock()


def demo_training(directory: Path, steps: int, interval: int | None):
    """The ``so8t train`` demo's Trainer, with the monitor at ``interval`` (None: without it)."""
    from so8t.monitor import MonitorConfig
    from so8t.training.finetune import build_training
    from so8t.training.options import TrainOptions

    clock = step_clock(WARMUP_STEPS + 1)
    monitor = None if interval is None else MonitorConfig(interval=interval)
    options = TrainOptions(model="demo", output_dir=str(directory), max_steps=steps, batch_size=8, max_length=256,
                           monitor=monitor, extra_callbacks=[clock])
    return build_training(options, directory).trainer, clock


@benchmark
def train_step_monitor(ctx: Context) -> list:
    steps, rounds = (QUICK_STEPS, QUICK_ROUNDS) if ctx.quick else (STEPS, ROUNDS)
    with tempfile.TemporaryDirectory(prefix="so8t-bench-monitor-") as scratch:
        runs = {
            name: demo_training(Path(scratch) / name.replace(" ", "-"), steps, interval)
            for name, interval in ((NO_MONITOR, None), (DEFAULT, DEFAULT_INTERVAL), (EVERY_STEP, 1))
        }
        mean_step_ms = interleaved_step_times(runs, rounds)
    shape = f"demo phi3 b8, {steps - WARMUP_STEPS} steps × {rounds}"
    plain = ctx.row("train step (monitor)", "step", NO_MONITOR, shape, "fp32", summarize(mean_step_ms[NO_MONITOR]),
                    kind="baseline")
    monitored = [
        ctx.row("train step (monitor)", "step", name, shape, "fp32", summarize(mean_step_ms[name]), references=[plain])
        for name in (DEFAULT, EVERY_STEP)
    ]
    return [plain, *monitored]


register_targets(Target(MINIMUM, "cpu", "train step (monitor)", "step", TimesReference(NO_MONITOR),
                        LOWER_IS_BETTER, 1.05, impls=(DEFAULT,)))
