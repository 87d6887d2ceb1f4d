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
from ._validate import check_tensor, compute_dtype

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


def squaring_count(skew: torch.Tensor) -> torch.Tensor:
    """Per-matrix s ≥ 0 with ‖A‖_F / 2^s ≤ SCALED_NORM_MAX (2); 0 for non-finite A (its NaN then propagates)."""
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
# Triton kernels: 8 lanes per matrix, lane j owning column j of every matrix in flight, held as 8
# row tensors [M, 8] (row i's value at lane j is X[i, j]). The 28 parameters sit in every lane
# (28 registers, loaded with a lane-broadcast load), so the Horner steps X·R are broadcast FMAs on
# registers with no lane crossing; only a product of two evolving matrices (a squaring, RᵀR, the
# final transpose) fetches another lane's value, one shuffle per value (tl.gather). 8×8 is below
# tl.dot's minimum K on the GPU and would leave most of an MMA idle. Per thread at most 28 + 64 + 32
# fp32 values are live (the backward's θ, dL/dR and four rows), so nothing spills.
# ---------------------------------------------------------------------------------------------
# The constants above as the kernels read them: a @triton.jit function reads globals only as constexprs.
_TAYLOR_DEGREE = tl.constexpr(TAYLOR_DEGREE[torch.float32])
_SCALED_NORM_MAX = tl.constexpr(SCALED_NORM_MAX)
_MAX_SQUARINGS = tl.constexpr(MAX_SQUARINGS)


@triton.jit
def _load_theta(theta_ptr, matrix, valid, lane):
    """The 28 parameters of each matrix, every value replicated on its 8 lanes ([M, 8] each, fp32)."""
    theta = ()
    for pair in tl.static_range(28):
        theta = theta + (tl.load(theta_ptr + matrix * 28 + pair + lane * 0, mask=valid, other=0.0).to(tl.float32),)
    return theta


@triton.jit
def _skew_times(theta, rows, i: tl.constexpr, SIGN: tl.constexpr):
    """Row i of (SIGN·A) B, where rows are B's rows and A[i, k] = θ_pair(i,k) above the diagonal,
    −θ_pair(k,i) below it: Σ_k SIGN·A[i, k] B[k, :], 7 FMAs."""
    total = tl.zeros_like(rows[0])
    for k in tl.static_range(8):
        if k > i:
            total += (SIGN * theta[i * (15 - i) // 2 + k - i - 1]) * rows[k]
        if k < i:
            total -= (SIGN * theta[k * (15 - k) // 2 + i - k - 1]) * rows[k]
    return total


@triton.jit
def _lane_value(row, k: tl.constexpr):
    """row's value at lane k, on every lane of its matrix: one shuffle."""
    return tl.gather(row, tl.full(row.shape, k, tl.int32), axis=1)


@triton.jit
def _times(left, right):
    """Rows of L·R: (L R)[i, j] = Σ_k L[i, k] R[k, j]; L[i, k] fetched from lane k (64 shuffles)."""
    out = ()
    for i in tl.static_range(8):
        total = _lane_value(left[i], 0) * right[0]
        for k in tl.static_range(1, 8):
            total += _lane_value(left[i], k) * right[k]
        out = out + (total,)
    return out


@triton.jit
def _identity_rows(lane, like):
    """Rows of I, shaped like ``like`` ([M, 8])."""
    rows = ()
    for i in tl.static_range(8):
        rows = rows + ((lane == i).to(tl.float32) + tl.zeros_like(like),)
    return rows


@triton.jit
def _select_rows(active, new, old):
    rows = ()
    for i in tl.static_range(8):
        rows = rows + (tl.where(active, new[i], old[i]),)
    return rows


@triton.jit
def _squaring_count(theta):
    """s = ceil(log2(‖A‖_F / SCALED_NORM_MAX)) clamped to [0, MAX_SQUARINGS], 0 for non-finite A."""
    sum_squares = theta[0] * theta[0]
    for pair in tl.static_range(1, 28):
        sum_squares += theta[pair] * theta[pair]
    norm = tl.sqrt(2.0 * sum_squares)  # ‖A‖_F² counts each θ twice
    count = tl.ceil(tl.log2(norm / _SCALED_NORM_MAX))
    count = tl.minimum(tl.maximum(count, 0.0), _MAX_SQUARINGS)
    return tl.where(count == count, count, 0.0)


@triton.jit
def _exact_power_of_two(exponent):
    """2^exponent for integer-valued fp32 exponent in [-126, 127], exact: built from its bits, where
    the GPU's exp2 (ex2.approx) may be off by an ulp and scale X inexactly."""
    return ((exponent.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_parameters(theta_ptr, num_matrices, MATRICES_PER_PROGRAM: tl.constexpr):
    """This program's matrices [M, 1], lanes [1, 8] and their mask, each matrix's squaring count s
    and 2^−s, and the 28 parameters of X = A / 2^s: what the forward and the backward start from."""
    matrix = tl.program_id(0) * MATRICES_PER_PROGRAM + tl.arange(0, MATRICES_PER_PROGRAM)[:, None]
    lane = tl.arange(0, 8)[None, :]
    valid = (matrix < num_matrices) & (lane < 8)
    theta = _load_theta(theta_ptr, matrix, valid, lane)
    count = _squaring_count(theta)
    scale = _exact_power_of_two(-count)
    scaled = ()
    for pair in tl.static_range(28):
        scaled = scaled + (theta[pair] * scale,)
    return matrix, lane, valid, count, scale, scaled


@triton.jit
def _reciprocal(k):
    """1 / k correctly rounded, as on the CPU (div.rn, not div.full)."""
    one = tl.full((), 1.0, tl.float32)
    return tl.div_rn(one, one * k)


@triton.jit(do_not_specialize=["num_matrices"])
def _exp_forward_kernel(
    theta_ptr, rotation_ptr, residual_ptr, num_matrices, MATRICES_PER_PROGRAM: tl.constexpr,
):
    matrix, lane, valid, count, _, scaled = _scaled_parameters(theta_ptr, num_matrices, MATRICES_PER_PROGRAM)
    # Horner: R = I + X R / k for k = K … 1 (the first step gives I + X / K).
    # A runtime loop, not unrolled: 13 copies of the step would only slow the compile.
    rows = _identity_rows(lane, scaled[0])
    for k in range(_TAYLOR_DEGREE, 0, -1):
        inverse = _reciprocal(k)
        updated = ()
        for i in tl.static_range(8):
            updated = updated + ((lane == i).to(tl.float32) + _skew_times(scaled, rows, i, 1.0) * inverse,)
        rows = updated
    for step in range(0, tl.max(tl.max(count, axis=1), axis=0).to(tl.int32)):
        rows = _select_rows(step < count, _times(rows, rows), rows)

    # ‖RᵀR − I‖_F: lane j forms column j of RᵀR, (RᵀR)[a, j] = Σ_i R[i, a] R[i, j].
    error = tl.zeros_like(rows[0])
    for a in tl.static_range(8):
        gram = _lane_value(rows[0], a) * rows[0]
        for i in tl.static_range(1, 8):
            gram += _lane_value(rows[i], a) * rows[i]
        gram -= (lane == a).to(tl.float32)
        error += gram * gram
    residual = tl.sqrt(tl.sum(error, axis=1))
    for i in tl.static_range(8):
        tl.store(rotation_ptr + matrix * 64 + i * 8 + lane, rows[i], mask=valid)
    tl.store(residual_ptr + tl.program_id(0) * MATRICES_PER_PROGRAM + tl.arange(0, MATRICES_PER_PROGRAM), residual,
             mask=tl.program_id(0) * MATRICES_PER_PROGRAM + tl.arange(0, MATRICES_PER_PROGRAM) < num_matrices)


@triton.jit(do_not_specialize=["num_matrices"])
def _exp_backward_kernel(
    theta_ptr, grad_rotation_ptr, grad_theta_ptr, num_matrices, MATRICES_PER_PROGRAM: tl.constexpr,
):
    matrix, lane, valid, count, scale, scaled = _scaled_parameters(theta_ptr, num_matrices, MATRICES_PER_PROGRAM)
    # E = dL/dR · 2^-s, every entry replicated on the 8 lanes: E P needs E[i, k] on lane j.
    direction = ()
    for entry in tl.static_range(64):
        value = tl.load(grad_rotation_ptr + matrix * 64 + entry + lane * 0, mask=valid, other=0.0)
        direction = direction + (value * scale,)

    # Horner on Y = Aᵀ/2^s = −X: P = I + Y P / k and its derivative F = (E P + Y F) / k.
    power = _identity_rows(lane, scaled[0])
    frechet = ()
    for i in tl.static_range(8):
        frechet = frechet + (tl.zeros_like(power[0]),)
    for k in range(_TAYLOR_DEGREE, 0, -1):
        inverse = _reciprocal(k)
        new_power = ()
        new_frechet = ()
        for i in tl.static_range(8):
            product = _skew_times(scaled, frechet, i, -1.0)
            for j in tl.static_range(8):
                product += direction[i * 8 + j] * power[j]
            new_frechet = new_frechet + (product * inverse,)
            new_power = new_power + ((lane == i).to(tl.float32) + _skew_times(scaled, power, i, -1.0) * inverse,)
        power = new_power
        frechet = new_frechet
    # exp(2Y) = exp(Y)²  ⇒  L(2Y, 2E) = L(Y, E) exp(Y) + exp(Y) L(Y, E).
    for step in range(0, tl.max(tl.max(count, axis=1), axis=0).to(tl.int32)):
        active = step < count
        frechet_power = _times(frechet, power)
        power_frechet = _times(power, frechet)
        summed = ()
        for i in tl.static_range(8):
            summed = summed + (frechet_power[i] + power_frechet[i],)
        frechet = _select_rows(active, summed, frechet)
        power = _select_rows(active, _times(power, power), power)

    # dθ for the pair (a, j), a < j, written by lane j: F[a, j] − F[j, a], with F[j, a] from lane a.
    for a in tl.static_range(7):
        transposed = tl.zeros_like(frechet[0])
        for i in tl.static_range(a + 1, 8):
            transposed = tl.where(lane == i, _lane_value(frechet[i], a), transposed)
        pair = a * (15 - a) // 2 + lane - a - 1
        tl.store(grad_theta_ptr + matrix * 28 + pair, frechet[a] - transposed, mask=valid & (lane > a))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# 16 matrices × 8 lanes = 128 threads (4 warps) per program; 11,520 matrices give 720 programs.
MATRICES_PER_PROGRAM = 16


def _flat_theta(theta: torch.Tensor) -> torch.Tensor:
    """[..., 28] → [N, 28] fp32: the math is fp32 anyway, and one kernel per arch compiles."""
    return theta.reshape(-1, NUM_PARAMS).to(torch.float32).contiguous()


def exp_triton(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = _flat_theta(theta)
    rotation = torch.empty(flat.shape[0], BLOCK_SIZE, BLOCK_SIZE, dtype=torch.float32, device=theta.device)
    residual = torch.empty(flat.shape[0], dtype=torch.float32, device=theta.device)
    if flat.shape[0]:
        grid = (triton.cdiv(flat.shape[0], MATRICES_PER_PROGRAM),)
        _exp_forward_kernel[grid](flat, rotation, residual, flat.shape[0], MATRICES_PER_PROGRAM=MATRICES_PER_PROGRAM)
    batch = theta.shape[:-1]
    return rotation.view(*batch, BLOCK_SIZE, BLOCK_SIZE), residual.view(batch)


def exp_backward_triton(grad_rotation: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    flat = _flat_theta(theta)
    grad_flat = grad_rotation.reshape(-1, BLOCK_SIZE, BLOCK_SIZE).to(torch.float32).contiguous()
    grad_theta = torch.empty(flat.shape, dtype=torch.float32, device=theta.device)
    if flat.shape[0]:
        grid = (triton.cdiv(flat.shape[0], MATRICES_PER_PROGRAM),)
        _exp_backward_kernel[grid](flat, grad_flat, grad_theta, flat.shape[0], MATRICES_PER_PROGRAM=MATRICES_PER_PROGRAM)
    return grad_theta.view(theta.shape).to(theta.dtype)


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
_FORWARD = _backend.kernels("so8_exp", exp_reference, exp_triton, "exp_forward")
_BACKWARD = _backend.kernels("so8_exp", exp_backward_reference, exp_backward_triton, "exp_backward")


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
