"""SO(8) rotations R = exp(A) from 28 Lie-algebra parameters per block, and ‖RᵀR − I‖_F.

A[i, j] = θ_k, A[j, i] = −θ_k for the pairs (i, j), i < j, in row-major order (0,1), (0,2), …, (6,7).
exp is scaling and squaring around a Horner-form Taylor core, with the number of squarings s chosen
per matrix on the device from ‖A‖_F (no host sync in the kernels). The gradient is the adjoint
Fréchet derivative L(Aᵀ, G), computed forward-mode through the same Taylor and squaring steps
(Al-Mohy & Higham 2009), so the backward needs only θ and dL/dR, never stored intermediates.

Order: reference (PyTorch; also the fallback and, in float64, the test oracle) → Triton kernels →
launchers → torch.library registration and the public ``so8_exp``.
"""

import torch

from . import _backend
from ._triton import tl, triton
from ._validate import check_tensor

BLOCK_SIZE = 8
NUM_PARAMS = 28
PAIRS = [(i, j) for i in range(BLOCK_SIZE) for j in range(i + 1, BLOCK_SIZE)]
# The Taylor core runs on X = A / 2^s with ‖X‖_F ≤ 2, so ‖X‖₂ ≤ √2 (skew: ‖A‖₂ ≤ ‖A‖_F/√2) and the
# truncation error of degree K is ≤ √2^(K+1)/(K+1)!: 1.5e-9 at K=13 (fp32), 1e-19 at K=22 (fp64).
# Each squaring doubles the rounding error already in R, so fewer squarings keep R orthogonal: measured
# on 500 random fp32 rotations at ‖A‖_F = 50, max ‖RᵀR − I‖_F is 1.4e-5 with ‖X‖_F ≤ 1 (6 squarings)
# and 5.8e-6 with ‖X‖_F ≤ 2 (5 squarings); ‖X‖_F ≤ 4 at K=18 gains nothing more (5.6e-6).
TAYLOR_DEGREE = {torch.float32: 13, torch.float64: 22}
SCALED_NORM_MAX = 2.0
# 2^64 covers every finite fp32 norm that still has a meaningful rotation; beyond it the residual flags it.
MAX_SQUARINGS = 64


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def _pair_indices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = zip(*PAIRS)
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def skew_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """[..., 28] → [..., 8, 8] skew-symmetric A, in theta's dtype."""
    rows, cols = _pair_indices(theta.device)
    skew = theta.new_zeros(*theta.shape[:-1], BLOCK_SIZE, BLOCK_SIZE)
    skew[..., rows, cols] = theta
    skew[..., cols, rows] = -theta
    return skew


def theta_grad_from_skew_grad(grad_skew: torch.Tensor) -> torch.Tensor:
    """Chain rule through skew_from_theta: dL/dθ_k = G_A[i, j] − G_A[j, i]."""
    rows, cols = _pair_indices(grad_skew.device)
    return grad_skew[..., rows, cols] - grad_skew[..., cols, rows]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def squaring_count(skew: torch.Tensor) -> torch.Tensor:
    """Per-matrix s ≥ 0 with ‖A‖_F / 2^s ≤ 1; 0 for non-finite A (its NaN then propagates)."""
    norm = torch.linalg.matrix_norm(skew)
    count = torch.ceil(torch.log2(norm / SCALED_NORM_MAX)).clamp(0, MAX_SQUARINGS)
    return torch.nan_to_num(count, nan=0.0)


def _squarings_to_run(count: torch.Tensor) -> int:
    # The reference loops to the largest s in the batch: free on CPU, one host sync on CUDA (the
    # Triton kernels loop per block of matrices on the device instead).
    return int(count.max().item()) if count.numel() else 0


def exp_reference(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R = exp(A) and ‖RᵀR − I‖_F, computed in fp32 (fp64 for fp64 theta)."""
    dtype = compute_dtype(theta.dtype)
    skew = skew_from_theta(theta.to(dtype))
    count = squaring_count(skew)
    scaled = skew * torch.exp2(-count)[..., None, None]
    eye = torch.eye(BLOCK_SIZE, dtype=dtype, device=theta.device)
    degree = TAYLOR_DEGREE[dtype]
    rotation = eye + scaled / degree
    for k in range(degree - 1, 0, -1):
        rotation = eye + (scaled @ rotation) / k
    for step in range(_squarings_to_run(count)):
        rotation = torch.where((step < count)[..., None, None], rotation @ rotation, rotation)
    residual = torch.linalg.matrix_norm(rotation.mT @ rotation - eye)
    return rotation, residual


def exp_backward_reference(grad_rotation: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """dL/dθ from dL/dR: the adjoint Fréchet derivative L(Aᵀ, G), in theta's dtype."""
    dtype = compute_dtype(theta.dtype)
    skew = skew_from_theta(theta.to(dtype))
    count = squaring_count(skew)
    scale = torch.exp2(-count)[..., None, None]
    scaled = skew.mT * scale
    direction = grad_rotation.to(dtype) * scale
    eye = torch.eye(BLOCK_SIZE, dtype=dtype, device=theta.device)
    degree = TAYLOR_DEGREE[dtype]
    # Horner: H_k = I + X H_{k+1} / k, so dH_k = (E H_{k+1} + X dH_{k+1}) / k.
    power = eye + scaled / degree
    frechet = direction / degree
    for k in range(degree - 1, 0, -1):
        frechet = (direction @ power + scaled @ frechet) / k
        power = eye + (scaled @ power) / k
    # exp(2X) = exp(X)²  ⇒  L(2X, 2E) = L(X, E) exp(X) + exp(X) L(X, E).
    for step in range(_squarings_to_run(count)):
        active = (step < count)[..., None, None]
        frechet = torch.where(active, frechet @ power + power @ frechet, frechet)
        power = torch.where(active, power @ power, power)
    return theta_grad_from_skew_grad(frechet).to(theta.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels: one program builds MATRICES_PER_PROGRAM rotations as a [M, 8, 8] tile. 8×8 is
# below tl.dot's minimum K on the GPU (16 for 16-bit, 8 for fp32 with padding waste), so products
# are broadcast-multiplies reduced with tl.sum: 512 FMAs per 8×8 product.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _matmul8(a, b):
    """[M, 8, 8] @ [M, 8, 8] per matrix."""
    return tl.sum(a[:, :, :, None] * b[:, None, :, :], axis=2)


@triton.jit
def _load_skew(theta_ptr, matrix, valid, row, col):
    """A[m, i, j] gathered from θ[m, k(i, j)]; row/col are the [1, 8, 1] and [1, 1, 8] index grids."""
    upper = row < col
    low = tl.minimum(row, col)
    high = tl.maximum(row, col)
    # Row-major pair index: row i starts at i(15 − i)/2, so k(i, j) = i(15 − i)/2 + j − i − 1.
    pair = low * (15 - low) // 2 + high - low - 1
    mask = valid[:, None, None] & (row != col)
    value = tl.load(theta_ptr + matrix[:, None, None] * 28 + pair, mask=mask, other=0.0).to(tl.float32)
    return tl.where(upper, value, -value)


@triton.jit
def _squaring_count(skew, SCALED_NORM_MAX: tl.constexpr, MAX_SQUARINGS: tl.constexpr):
    norm = tl.sqrt(tl.sum(tl.sum(skew * skew, axis=2), axis=1))
    count = tl.ceil(tl.log2(norm / SCALED_NORM_MAX))
    count = tl.minimum(tl.maximum(count, 0.0), MAX_SQUARINGS)
    return tl.where(count == count, count, 0.0)


@triton.jit
def _exp_forward_kernel(
    theta_ptr, rotation_ptr, residual_ptr, num_matrices,
    MATRICES_PER_PROGRAM: tl.constexpr, TAYLOR_DEGREE: tl.constexpr,
    SCALED_NORM_MAX: tl.constexpr, MAX_SQUARINGS: tl.constexpr,
):
    matrix = tl.program_id(0) * MATRICES_PER_PROGRAM + tl.arange(0, MATRICES_PER_PROGRAM)
    valid = matrix < num_matrices
    index = tl.arange(0, 8)
    row = index[None, :, None]
    col = index[None, None, :]
    eye = (row == col).to(tl.float32)

    skew = _load_skew(theta_ptr, matrix, valid, row, col)
    count = _squaring_count(skew, SCALED_NORM_MAX, MAX_SQUARINGS)
    scaled = skew * tl.exp2(-count)[:, None, None]
    rotation = eye + scaled / TAYLOR_DEGREE
    for k in tl.static_range(TAYLOR_DEGREE - 1, 0, -1):
        rotation = eye + _matmul8(scaled, rotation) / k
    for step in range(0, tl.max(count, axis=0).to(tl.int32)):
        squared = _matmul8(rotation, rotation)
        rotation = tl.where((step < count)[:, None, None], squared, rotation)

    gram = tl.sum(rotation[:, :, :, None] * rotation[:, :, None, :], axis=1) - eye
    residual = tl.sqrt(tl.sum(tl.sum(gram * gram, axis=2), axis=1))
    offsets = matrix[:, None, None] * 64 + row * 8 + col
    tl.store(rotation_ptr + offsets, rotation, mask=valid[:, None, None])
    tl.store(residual_ptr + matrix, residual, mask=valid)


@triton.jit
def _exp_backward_kernel(
    theta_ptr, grad_rotation_ptr, grad_theta_ptr, num_matrices,
    MATRICES_PER_PROGRAM: tl.constexpr, TAYLOR_DEGREE: tl.constexpr,
    SCALED_NORM_MAX: tl.constexpr, MAX_SQUARINGS: tl.constexpr,
):
    matrix = tl.program_id(0) * MATRICES_PER_PROGRAM + tl.arange(0, MATRICES_PER_PROGRAM)
    valid = matrix < num_matrices
    index = tl.arange(0, 8)
    row = index[None, :, None]
    col = index[None, None, :]
    eye = (row == col).to(tl.float32)
    offsets = matrix[:, None, None] * 64 + row * 8 + col

    skew = _load_skew(theta_ptr, matrix, valid, row, col)
    count = _squaring_count(skew, SCALED_NORM_MAX, MAX_SQUARINGS)
    scale = tl.exp2(-count)[:, None, None]
    scaled = -skew * scale  # Aᵀ = −A
    direction = tl.load(grad_rotation_ptr + offsets, mask=valid[:, None, None], other=0.0) * scale
    power = eye + scaled / TAYLOR_DEGREE
    frechet = direction / TAYLOR_DEGREE
    for k in tl.static_range(TAYLOR_DEGREE - 1, 0, -1):
        frechet = (_matmul8(direction, power) + _matmul8(scaled, frechet)) / k
        power = eye + _matmul8(scaled, power) / k
    for step in range(0, tl.max(count, axis=0).to(tl.int32)):
        active = (step < count)[:, None, None]
        frechet = tl.where(active, _matmul8(frechet, power) + _matmul8(power, frechet), frechet)
        power = tl.where(active, _matmul8(power, power), power)

    # dθ_k = G_A[i, j] − G_A[j, i], written from the upper triangle.
    antisymmetric = frechet - tl.permute(frechet, (0, 2, 1))
    pair = row * (15 - row) // 2 + col - row - 1
    mask = valid[:, None, None] & (row < col)
    tl.store(grad_theta_ptr + matrix[:, None, None] * 28 + pair, antisymmetric, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# 16 matrices → a [16, 8, 8, 8] product tile of 8192 fp32 values per program (64 per thread at 4 warps).
MATRICES_PER_PROGRAM = 16


def _kernel_constants() -> dict:
    return dict(
        MATRICES_PER_PROGRAM=MATRICES_PER_PROGRAM,
        TAYLOR_DEGREE=TAYLOR_DEGREE[torch.float32],
        SCALED_NORM_MAX=SCALED_NORM_MAX,
        MAX_SQUARINGS=MAX_SQUARINGS,
    )


def exp_triton(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = theta.reshape(-1, NUM_PARAMS).contiguous()
    rotation = torch.empty(flat.shape[0], BLOCK_SIZE, BLOCK_SIZE, dtype=torch.float32, device=theta.device)
    residual = torch.empty(flat.shape[0], dtype=torch.float32, device=theta.device)
    if flat.shape[0]:
        grid = (triton.cdiv(flat.shape[0], MATRICES_PER_PROGRAM),)
        _exp_forward_kernel[grid](flat, rotation, residual, flat.shape[0], **_kernel_constants())
    batch = theta.shape[:-1]
    return rotation.view(*batch, BLOCK_SIZE, BLOCK_SIZE), residual.view(batch)


def exp_backward_triton(grad_rotation: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    flat = theta.reshape(-1, NUM_PARAMS).contiguous()
    grad_flat = grad_rotation.reshape(-1, BLOCK_SIZE, BLOCK_SIZE).to(torch.float32).contiguous()
    grad_theta = torch.empty(flat.shape, dtype=torch.float32, device=theta.device)
    if flat.shape[0]:
        grid = (triton.cdiv(flat.shape[0], MATRICES_PER_PROGRAM),)
        _exp_backward_kernel[grid](flat, grad_flat, grad_theta, flat.shape[0], **_kernel_constants())
    return grad_theta.view(theta.shape).to(theta.dtype)


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
# The C++ kernels (csrc/) register themselves as torch.ops.so8t_cpp.* when the extension loads.
_FORWARD = {
    "torch": exp_reference,
    "triton": exp_triton,
    "cpp": lambda theta: torch.ops.so8t_cpp.exp_forward(theta),
}
_BACKWARD = {
    "torch": exp_backward_reference,
    "triton": exp_backward_triton,
    "cpp": lambda grad_rotation, theta: torch.ops.so8t_cpp.exp_backward(grad_rotation, theta),
}


@torch.library.custom_op("so8t::so8_exp", mutates_args=())
def _so8_exp_op(theta: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](theta)


@_so8_exp_op.register_fake
def _(theta, backend):
    dtype = compute_dtype(theta.dtype)
    batch = theta.shape[:-1]
    return theta.new_empty(*batch, BLOCK_SIZE, BLOCK_SIZE, dtype=dtype), theta.new_empty(batch, dtype=dtype)


@torch.library.custom_op("so8t::so8_exp_backward", mutates_args=())
def _so8_exp_backward_op(grad_rotation: torch.Tensor, theta: torch.Tensor, backend: str) -> torch.Tensor:
    return _BACKWARD[backend](grad_rotation, theta)


@_so8_exp_backward_op.register_fake
def _(grad_rotation, theta, backend):
    return torch.empty_like(theta)


def _setup_context(ctx, inputs, output):
    theta, backend = inputs
    ctx.save_for_backward(theta)
    ctx.backend = backend


def _backward(ctx, grad_rotation, grad_residual):
    # The residual is a measurement of R, not a loss term: its gradient is not propagated.
    (theta,) = ctx.saved_tensors
    return _so8_exp_backward_op(grad_rotation, theta, ctx.backend), None


_so8_exp_op.register_autograd(_backward, setup_context=_setup_context)


def so8_exp(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations R = exp(A(θ)) ∈ SO(8) and their orthogonality residual ‖RᵀR − I‖_F.

    theta: ``[..., 28]`` float32/bfloat16/float16/float64. Returns R ``[..., 8, 8]`` and residual
    ``[...]``, both float32 (float64 for float64 theta, computed by the reference). Differentiable
    w.r.t. theta through R; the residual is a measurement and carries no gradient.
    """
    check_tensor("theta", theta)
    if theta.dim() == 0 or theta.shape[-1] != NUM_PARAMS:
        shape = tuple(theta.shape)
        raise ValueError(f"theta has shape {shape}; expected [..., {NUM_PARAMS}] (28 so(8) parameters per block)")
    backend = "torch" if theta.dtype == torch.float64 else _backend.choose_backend("so8_exp", theta.device)
    return _so8_exp_op(theta, backend)
