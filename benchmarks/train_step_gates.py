"""Training-step time with SO(8) gates on every intermediate layer against the same QLoRA training
without gates, as a ratio measured in one run (the minimum: ≤ 1.15× on CPU, ≤ 1.03× on a GPU).

CPU: the ``so8t train`` demo (embedded tiny Phi-3, 4-bit NF4 base, LoRA, bundled data, batch 8).
CUDA: the same recipe at Phi-3-mini shapes (hidden 3072, 32 layers, vocabulary 32064; random weights,
no download), in bf16: 30 gated layers × 384 blocks = 11,520 rotations per step. The monitor is off in
both runs, so the ratio is the gates' own cost; runs take turns, so a shared machine's changing load
hits both alike. A sample is the mean step time of one run after its warm-up steps.
"""

import tempfile
from pathlib import Path

from harness import (
    LOWER_IS_BETTER,
    MINIMUM,
    Context,
    Target,
    TimesReference,
    baseline_and_variant_rows,
    benchmark,
    interleaved_step_times,
    register_targets,
)
from train_step_monitor import step_clock

STEPS, WARMUP_STEPS, ROUNDS = 50, 10, 3
QUICK_STEPS, QUICK_ROUNDS = 20, 2
PHI3_MINI_SHAPES = dict(
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
)
NO_GATES, GATES = "QLoRA, no gates", "QLoRA + gates"


def qlora_training(directory: Path, steps: int, gates: bool, on_gpu: bool):
    from so8t.training.finetune import build_training
    from so8t.training.options import TrainOptions

    clock = step_clock(WARMUP_STEPS + 1)
    options = TrainOptions(model="demo", output_dir=str(directory), max_steps=steps, load_in_4bit=True, gates=gates,
                           batch_size=8, max_length=256, monitor=None, bf16=on_gpu, extra_callbacks=[clock])
    overrides = PHI3_MINI_SHAPES if on_gpu else None
    return build_training(options, directory, demo_overrides=overrides).trainer, clock


@benchmark
def train_step_gates(ctx: Context) -> list:
    steps, rounds = (QUICK_STEPS, QUICK_ROUNDS) if ctx.quick else (STEPS, ROUNDS)
    on_gpu = ctx.device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="so8t-bench-gates-") as scratch:
        runs = {name: qlora_training(Path(scratch) / name.replace(" ", "-").replace(",", ""), steps, gates, on_gpu)
                for name, gates in ((NO_GATES, False), (GATES, True))}
        mean_step_ms = interleaved_step_times(runs, rounds)
    shape = f"{'phi3-mini' if on_gpu else 'demo phi3'} nf4 b8, {steps - WARMUP_STEPS} steps × {rounds}"
    dtype = "bf16" if on_gpu else "fp32"
    return baseline_and_variant_rows(ctx, "train step (gates)", shape, dtype, mean_step_ms, NO_GATES, GATES)


register_targets(
    Target(MINIMUM, "cpu", "train step (gates)", "step", TimesReference(NO_GATES), LOWER_IS_BETTER, 1.15,
           impls=(GATES,)),
    Target(MINIMUM, "cuda", "train step (gates)", "step", TimesReference(NO_GATES), LOWER_IS_BETTER, 1.03,
           impls=(GATES,)),
)
