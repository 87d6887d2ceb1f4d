"""``python benchmarks/loss_step.py``: peak memory and time of one causal-LM loss step (forward and
backward), the model's own path against ``so8t_kernels.linear_cross_entropy``, CPU fp32.

Also a suite of ``benchmarks/run.py`` (a long one, run when named: ``--suites loss_step``): in-process
timing rows of the op on every backend against the model's path at the real model's shapes (H = 576,
V = 49,152) and 1024 tokens (128 with ``--quick``), where one step takes seconds on a 2-core CPU.

The model's path is what a Hugging Face causal LM runs: ``logits = hidden @ weightᵀ``, then
``F.cross_entropy(logits.float(), labels)`` and its backward (dL/dhidden; dL/dweight only with
``--train-head``: with LoRA the head is frozen). Each variant runs in a fresh subprocess: inputs built,
one warm-up step, the peak-RSS counter reset (``/proc/self/clear_refs``), then ``--steps`` timed steps;
peak memory = peak RSS during the timed steps − RSS before them, which sees every allocation (torch's,
BLAS workspaces, the extension's), unlike tracemalloc. The variants take turns round by round so that a
shared machine's load hits them alike. Prints a Markdown table for benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    LOWER_IS_BETTER,
    MINIMUM,
    Context,
    Target,
    TimesReference,
    benchmark,
    dtype_name,
    register_targets,
    shape_text,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (hidden size H, vocabulary V)
    "smollm2-135m": (576, 49152),
    "phi-3.5-mini": (3072, 32064),
}
VARIANTS = ("model loss", "so8t", "so8t + stats")


SUITE_HIDDEN, SUITE_VOCAB, SUITE_TOKENS = 576, 49152, 1024
MODEL_PATH = "linear+cross_entropy"


def model_loss(hidden, weight, labels):
    """The model's own path: the logits tensor, then F.cross_entropy on its fp32 copy."""
    import torch.nn.functional as F

    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)


@benchmark
def loss_step_benchmark(ctx: Context) -> list:
    import torch

    from so8t_kernels import linear_cross_entropy

    tokens = SUITE_TOKENS // 8 if ctx.quick else SUITE_TOKENS
    shape = shape_text(tokens, SUITE_HIDDEN, SUITE_VOCAB)
    rows = []
    for dtype in ctx.dtypes:
        name = dtype_name(dtype)
        hidden = torch.randn(tokens, SUITE_HIDDEN, device=ctx.device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(SUITE_VOCAB, SUITE_HIDDEN, device=ctx.device) / SUITE_HIDDEN**0.5).to(dtype)
        labels = torch.randint(0, SUITE_VOCAB, (tokens,), device=ctx.device)
        plain = hidden.detach()
        stats = torch.zeros(7, device=ctx.device)

        def step(loss_fn):
            def run():
                hidden.grad = None
                loss_fn().backward()
            return run

        baselines = {
            "fwd": ctx.row("linear_cross_entropy", "fwd", MODEL_PATH, shape, name,
                           ctx.time(lambda: model_loss(plain, weight, labels)), kind="baseline"),
            "fwd+bwd": ctx.row("linear_cross_entropy", "fwd+bwd", MODEL_PATH, shape, name,
                               ctx.time(step(lambda: model_loss(hidden, weight, labels))), kind="baseline"),
        }
        rows += baselines.values()
        for backend in ctx.backends:
            with ctx.recording_errors(f"linear_cross_entropy {name} on {backend}"), ctx.backend(backend):
                kernels = {
                    "fwd": lambda: linear_cross_entropy(plain, weight, labels),
                    "fwd+stats": lambda: linear_cross_entropy(plain, weight, labels, stats=stats),
                    "fwd+bwd": step(lambda: linear_cross_entropy(hidden, weight, labels)),
                }
                for pass_, fn in kernels.items():
                    reference = baselines["fwd+bwd" if pass_ == "fwd+bwd" else "fwd"]
                    rows.append(ctx.row("linear_cross_entropy", pass_, backend, shape, name, ctx.time(fn),
                                        references=[reference]))
    return rows


register_targets(
    Target(MINIMUM, "cpu", "linear_cross_entropy", "fwd+bwd", TimesReference(MODEL_PATH), LOWER_IS_BETTER, 1.0,
           impls=("cpp",)),
)


def read_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(variant: str, hidden_size: int, vocab: int, tokens: int, steps: int, train_head: bool) -> dict:
    """One variant in this (fresh) process: {"peak_mb", "step_s": [...]}."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import torch.nn.functional as F

    from so8t_kernels import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_(train_head)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::50] = -100  # padding, as in a real batch
    stats = torch.zeros(7)

    def step():
        hidden.grad = weight.grad = None
        if variant == "model loss":
            loss = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, stats=stats if variant == "so8t + stats" else None)
        loss.backward()

    step()
    hidden.grad = weight.grad = None
    before_kb = read_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"peak_mb": (read_status_kb("VmHWM") - before_kb) / 1024, "step_s": times}


def run_child(variant, shape, tokens, steps, threads, train_head) -> dict:
    hidden_size, vocab = SHAPES[shape]
    command = [sys.executable, __file__, "--child", variant, "--shapes", shape, "--tokens", str(tokens),
               "--steps", str(steps), "--threads", str(threads)] + (["--train-head"] if train_head else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {','.join(SHAPES)}")
    parser.add_argument("--tokens", type=int, default=4096, help="N, tokens per step (default 4096)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per subprocess (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="subprocesses per variant, taking turns (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--train-head", action="store_true", help="the LM head's weight requires grad too")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {list(SHAPES)}")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        hidden_size, vocab = SHAPES[shapes[0]]
        print(json.dumps(child(args.child, hidden_size, vocab, args.tokens, args.steps, args.train_head)))
        return 0

    import torch

    head = "trained" if args.train_head else "frozen (LoRA)"
    print(f"loss step, CPU fp32, N = {args.tokens} tokens, head {head}, {args.threads} threads, torch "
          f"{torch.__version__}, {platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print("\n| shape | H | V | variant | peak MB | × model | step s (min) | × model |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        results = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                results[variant].append(run_child(variant, shape, args.tokens, args.steps, args.threads, args.train_head))
        peak = {v: max(r["peak_mb"] for r in runs) for v, runs in results.items()}
        best = {v: min(t for r in runs for t in r["step_s"]) for v, runs in results.items()}
        hidden_size, vocab = SHAPES[shape]
        for variant in VARIANTS:
            print(f"| {shape} | {hidden_size} | {vocab} | {variant} | {peak[variant]:.0f} | "
                  f"{peak[variant] / peak['model loss']:.3f} | {best[variant]:.2f} | "
                  f"{best[variant] / best['model loss']:.2f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
