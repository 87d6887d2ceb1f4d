"""The so8t_kernels ops against a copy, a sum and the obvious PyTorch code.

Per op and dtype, in this order: the references (``x.clone()`` and one ``sum()`` over the op's
largest tensor), the torch baselines, then the op on every selected backend. Every ratio is against
rows of the same run. Byte counts are the traffic an ideal kernel needs: what it must read plus
what it must write, once.
"""

import torch

from harness import (
    GOAL,
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    MINIMUM,
    Context,
    Microseconds,
    PercentOfCopyBandwidth,
    SpeedupOver,
    Target,
    TimesReference,
    benchmark,
    dtype_name,
    register_targets,
    shape_text,
    tensor_bytes,
)
from so8t_kernels import logit_stats, so8_exp, so8_rotate

# Sizes of a Phi-3-mini-like model: 30 gated layers, hidden 3072 (384 blocks of 8), a batch of
# 4096 tokens, a 32,064-token vocabulary over 2048 positions. --quick divides the token counts by 8.
NUM_LAYERS, HIDDEN, NUM_TOKENS, VOCAB, NUM_POSITIONS = 30, 3072, 4096, 32064, 2048
QUICK_DIVISOR = 8
NUM_BLOCKS = HIDDEN // 8
NUM_PARAMS = 28  # strictly upper triangle of an 8×8 skew-symmetric matrix


def forward_backward(forward, leaves, grad):
    """One training-style pass: forward, then ``.backward(grad)`` with a fixed grad. Grads are
    reset first so that no call pays for accumulating into an existing ``.grad``."""

    def step():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad)

    return step


def reference_rows(ctx: Context, op: str, tensor: torch.Tensor, shape: str) -> list:
    """``clone`` (read + write the bytes: the copy bandwidth) and ``sum`` (read them once)."""
    dtype = dtype_name(tensor.dtype)
    clone = ctx.row(op, "-", "clone", shape, dtype, ctx.time(tensor.clone), kind="reference",
                    bytes_moved=2 * tensor_bytes(tensor))
    total = ctx.row(op, "-", "sum", shape, dtype, ctx.time(tensor.sum), kind="reference",
                    bytes_moved=tensor_bytes(tensor), references=[clone])
    return [clone, total]


# ---------------------------------------------------------------------------------------------
# so8_exp: 11,520 blocks (30 layers × 384), theta [30, 384, 28] fp32 → R [30, 384, 8, 8] fp32.
# Per block: ≈ 19 products of 8×8 matrices (13 Taylor steps, up to 5 squarings, the residual RᵀR),
# 1024 FLOPs each, ≈ 20 kFLOP against 372 bytes (read θ: 28 × 4 B, write R: 64 × 4 B and the
# residual: 4 B): compute-bound, unlike the other two ops, so its rows carry no GB/s; the clone and
# sum of R's 2.9 MB are there for scale.
# Always fp32: theta is an fp32 trainable parameter, and R is fp32 whatever theta's dtype.
# ---------------------------------------------------------------------------------------------
def matrix_exp_baseline(theta: torch.Tensor) -> torch.Tensor:
    """The obvious PyTorch exp: scatter theta into a skew-symmetric A, then torch.linalg.matrix_exp."""
    rows, cols = torch.triu_indices(8, 8, offset=1, device=theta.device)
    upper = theta.new_zeros(*theta.shape[:-1], 8, 8)
    upper[..., rows, cols] = theta
    return torch.linalg.matrix_exp(upper - upper.mT)


@benchmark
def so8_exp_benchmark(ctx: Context) -> list:
    layers = NUM_LAYERS // QUICK_DIVISOR if ctx.quick else NUM_LAYERS
    shape = shape_text(layers, NUM_BLOCKS, NUM_PARAMS)
    # ‖A‖_F ≈ 0.3·√56 ≈ 2.2, a trained gate's scale: one or two squarings in either exp.
    theta = (0.3 * torch.randn(layers, NUM_BLOCKS, NUM_PARAMS, device=ctx.device)).requires_grad_()
    with torch.no_grad():
        rotation = matrix_exp_baseline(theta)
    grad_rotation = torch.randn_like(rotation)
    rows = reference_rows(ctx, "so8_exp", rotation.detach(), shape)
    clone_and_sum = list(rows)
    plain_theta = theta.detach()
    baselines = {
        "fwd": lambda: matrix_exp_baseline(plain_theta),
        "fwd+bwd": forward_backward(lambda: matrix_exp_baseline(theta), [theta], grad_rotation),
    }
    baseline_rows = {
        pass_: ctx.row("so8_exp", pass_, "matrix_exp", shape, "fp32", ctx.time(fn), kind="baseline",
                       references=clone_and_sum)
        for pass_, fn in baselines.items()
    }
    rows += baseline_rows.values()

    for backend in ctx.backends:
        with ctx.recording_errors(f"so8_exp on {backend}"), ctx.backend(backend):
            kernels = {
                "fwd": lambda: so8_exp(plain_theta),
                "fwd+bwd": forward_backward(lambda: so8_exp(theta)[0], [theta], grad_rotation),
            }
            for pass_, fn in kernels.items():
                rows.append(ctx.row("so8_exp", pass_, backend, shape, "fp32", ctx.time(fn),
                                    references=[*clone_and_sum, baseline_rows[pass_]]))
    return rows


# ---------------------------------------------------------------------------------------------
# so8_rotate: x [4096, 3072] → y = x + σ(α)(R x − x) per 8-wide chunk, i.e. y_b = M_b x_b with
# M_b = (1 − g)I + gR_b. 8 FMAs = 16 FLOPs per element against one read and one write of it
# (fp32: 2 FLOP/byte): memory-bound, so the goal is the copy bandwidth.
# ---------------------------------------------------------------------------------------------
def mixing_matrices(rotation, alpha, dtype):
    gate = torch.sigmoid(alpha)
    eye = torch.eye(8, device=rotation.device)
    return ((1 - gate) * eye + gate * rotation).to(dtype)


def einsum_baseline(x, rotation, alpha):
    """The obvious PyTorch rotation: one batched 8×8 product per chunk, in x's dtype."""
    blocks = x.unflatten(-1, (-1, 8))
    return torch.einsum("tbj,bij->tbi", blocks, mixing_matrices(rotation, alpha, x.dtype)).flatten(-2)


def block_diag_baseline(x, rotation, alpha):
    """The naive dense form: x @ blockdiag(M)ᵀ, a 3072×3072 matmul (2·4096·3072² = 77 GFLOP)."""
    dense = torch.block_diag(*mixing_matrices(rotation, alpha, x.dtype))
    return x @ dense.mT


@benchmark
def so8_rotate_benchmark(ctx: Context) -> list:
    num_tokens = NUM_TOKENS // QUICK_DIVISOR if ctx.quick else NUM_TOKENS
    shape = shape_text(num_tokens, HIDDEN)
    skew = torch.randn(NUM_BLOCKS, 8, 8, device=ctx.device)
    rotation = torch.linalg.matrix_exp(0.1 * (skew - skew.mT)).requires_grad_()
    alpha = torch.tensor(-2.0, device=ctx.device, requires_grad=True)
    plain_rotation, plain_alpha = rotation.detach(), alpha.detach()
    rows = []
    for dtype in ctx.dtypes:
        name = dtype_name(dtype)
        x = torch.randn(num_tokens, HIDDEN, device=ctx.device, dtype=dtype, requires_grad=True)
        plain_x = x.detach()
        grad_y = torch.randn_like(plain_x)
        stats = torch.zeros(3, device=ctx.device)
        n_bytes = tensor_bytes(plain_x)
        # fwd: read x, write y. fwd+bwd adds: read dy and x, write dx (dR and dα reduce dy·xᵀ on the
        # way, 384 × 64 floats). The 98 KB of R are noise next to 50 MB of x and are left out.
        bytes_moved = {"fwd": 2 * n_bytes, "fwd+stats": 2 * n_bytes, "fwd+bwd": 5 * n_bytes}

        refs = reference_rows(ctx, "so8_rotate", plain_x, shape)
        rows += refs
        leaves = [x, rotation, alpha]
        baselines = {
            ("fwd", "einsum"): lambda: einsum_baseline(plain_x, plain_rotation, plain_alpha),
            ("fwd+bwd", "einsum"): forward_backward(lambda: einsum_baseline(x, rotation, alpha), leaves, grad_y),
            # ~0.4 s a call on a 2-core CPU: the timing plan's minimum of 3 samples keeps it short.
            ("fwd", "block_diag"): lambda: block_diag_baseline(plain_x, plain_rotation, plain_alpha),
            ("fwd+bwd", "block_diag"): forward_backward(
                lambda: block_diag_baseline(x, rotation, alpha), leaves, grad_y
            ),
        }
        baseline_rows = {"fwd": [], "fwd+stats": [], "fwd+bwd": []}
        for (pass_, impl), fn in baselines.items():
            row = ctx.row("so8_rotate", pass_, impl, shape, name, ctx.time(fn), kind="baseline",
                          bytes_moved=bytes_moved[pass_], references=refs)
            baseline_rows[pass_].append(row)
            rows.append(row)
        # fwd+stats: the forward that also reduces y to Σy², max |y| and the non-finite count, in place
        # of a separate pass over y: its × clone against fwd's is the monitoring cost.
        for backend in ctx.backends:
            with ctx.recording_errors(f"so8_rotate {name} on {backend}"), ctx.backend(backend):
                kernels = {
                    "fwd": lambda: so8_rotate(plain_x, plain_rotation, plain_alpha),
                    "fwd+stats": lambda: so8_rotate(plain_x, plain_rotation, plain_alpha, stats=stats),
                    "fwd+bwd": forward_backward(lambda: so8_rotate(x, rotation, alpha), leaves, grad_y),
                }
                for pass_, fn in kernels.items():
                    rows.append(ctx.row("so8_rotate", pass_, backend, shape, name, ctx.time(fn),
                                        bytes_moved=bytes_moved[pass_], references=[*refs, *baseline_rows[pass_]]))
    return rows


# ---------------------------------------------------------------------------------------------
# logit_stats: logits [2048, 32064] → mean, std, min, max, non-finite count. One read of 263 MB
# (fp32) and ~6 FLOPs per element: memory-bound; the goal is one sum() pass.
# ---------------------------------------------------------------------------------------------
def moments_baseline(logits):
    """The obvious PyTorch statistics: four passes, no non-finite handling."""
    return torch.stack([logits.mean(), logits.std(correction=0), logits.min(), logits.max()])


@benchmark
def logit_stats_benchmark(ctx: Context) -> list:
    num_positions = NUM_POSITIONS // QUICK_DIVISOR if ctx.quick else NUM_POSITIONS
    shape = shape_text(num_positions, VOCAB)
    rows = []
    for dtype in ctx.dtypes:
        name = dtype_name(dtype)
        logits = 4 * torch.randn(num_positions, VOCAB, device=ctx.device, dtype=dtype)
        n_bytes = tensor_bytes(logits)  # read once; the 5 outputs are 20 bytes
        refs = reference_rows(ctx, "logit_stats", logits, shape)
        baseline = ctx.row("logit_stats", "fwd", "mean+std+min+max", shape, name,
                           ctx.time(lambda: moments_baseline(logits)), kind="baseline",
                           bytes_moved=n_bytes, references=refs)
        rows += [*refs, baseline]
        for backend in ctx.backends:
            with ctx.recording_errors(f"logit_stats {name} on {backend}"), ctx.backend(backend):
                rows.append(ctx.row("logit_stats", "fwd", backend, shape, name, ctx.time(lambda: logit_stats(logits)),
                                    bytes_moved=n_bytes, references=[*refs, baseline]))
    return rows


# ---------------------------------------------------------------------------------------------
# Targets. CPU: the minimum any backend must reach, and the goal the C++ kernels aim for; GPU: Triton's.
# ---------------------------------------------------------------------------------------------
register_targets(
    Target(MINIMUM, "cpu", "so8_exp", "fwd+bwd", SpeedupOver("matrix_exp"), HIGHER_IS_BETTER, 3),
    Target(GOAL, "cpu", "so8_exp", "fwd+bwd", SpeedupOver("matrix_exp"), HIGHER_IS_BETTER, 10),
    Target(MINIMUM, "cpu", "so8_rotate", "fwd", TimesReference("clone"), LOWER_IS_BETTER, 1.5),
    Target(GOAL, "cpu", "so8_rotate", "fwd", TimesReference("clone"), LOWER_IS_BETTER, 1.3),
    Target(GOAL, "cpu", "so8_rotate", "fwd+bwd", TimesReference("clone"), LOWER_IS_BETTER, 3),
    Target(GOAL, "cpu", "logit_stats", "fwd", TimesReference("sum"), LOWER_IS_BETTER, 1.5),
    Target(GOAL, "cuda", "so8_rotate", "fwd", PercentOfCopyBandwidth(), HIGHER_IS_BETTER, 85,
           impls=("triton",)),
    Target(GOAL, "cuda", "so8_rotate", "fwd+bwd", PercentOfCopyBandwidth(), HIGHER_IS_BETTER, 70,
           impls=("triton",)),
    Target(MINIMUM, "cuda", "so8_exp", "fwd+bwd", Microseconds(), LOWER_IS_BETTER, 30, impls=("triton",)),
    Target(MINIMUM, "cuda", "logit_stats", "fwd", PercentOfCopyBandwidth(), HIGHER_IS_BETTER, 85,
           impls=("triton",)),
)
