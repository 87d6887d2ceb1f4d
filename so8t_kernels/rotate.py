"""Gated SO(8) block rotation of hidden states: y_b = x_b + σ(α)(R_b x_b − x_b) = M_b x_b per 8-wide chunk.

M_b = (1 − g)I + gR_b with g = σ(α). Backward: dx_b = M_bᵀ dy_b; with S_b = Σ_tokens dy_b x_bᵀ,
dR_b = g S_b and dα = g(1 − g) Σ_b ⟨S_b, R_b − I⟩. Math in fp32 whatever the input dtype.
The forward can also reduce y into activation statistics (Σ y², max |y|, non-finite count) while y
is still in registers, so monitoring costs no extra pass over memory.

Order: reference → Triton kernels → launchers → torch.library registration and ``so8_rotate``.
"""

import torch

from . import _backend
from ._triton import tl, triton
from ._validate import check_hidden_size, check_same_device, check_tensor

BLOCK_SIZE = 8
NUM_STATS = 3  # Σ y² over finite y, max |y| over finite y, count of non-finite y


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixing_matrices(rotation: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """M_b = (1 − g)I + gR_b."""
    eye = torch.eye(BLOCK_SIZE, dtype=rotation.dtype, device=rotation.device)
    return (1 - gate) * eye + gate * rotation


def activation_stats_reference(y: torch.Tensor) -> torch.Tensor:
    """[Σ y², max |y|, non-finite count] over the values of y as stored, in fp32."""
    values = y.reshape(-1).to(torch.float64 if y.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(values)
    magnitude = torch.where(finite, values.abs(), 0)
    sum_squares = (magnitude * magnitude).sum()
    max_abs = magnitude.max() if values.numel() else magnitude.new_zeros(())
    nonfinite = (~finite).sum().to(values.dtype)
    return torch.stack([sum_squares, max_abs, nonfinite]).to(torch.float32)


def rotate_reference(x, rotation, alpha, with_stats: bool = False):
    dtype = compute_dtype(x.dtype)
    gate = torch.sigmoid(alpha.to(dtype))
    blocks = x.to(dtype).unflatten(-1, (-1, BLOCK_SIZE))
    mixing = mixing_matrices(rotation.to(dtype), gate)
    y = torch.einsum("...bj,bij->...bi", blocks, mixing).flatten(-2).to(x.dtype).contiguous()
    stats = activation_stats_reference(y) if with_stats else y.new_empty(0, dtype=torch.float32)
    return y, stats


def rotate_backward_reference(grad_y, x, rotation, alpha, need_x: bool, need_params: bool):
    dtype = compute_dtype(x.dtype)
    gate = torch.sigmoid(alpha.to(dtype))
    rotation_c = rotation.to(dtype)
    grad_blocks = grad_y.to(dtype).unflatten(-1, (-1, BLOCK_SIZE))
    # Distinct empty tensors for the parts not asked for: a custom op's outputs may not alias each other.
    grad_x, grad_rotation, grad_alpha = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_x:
        mixing = mixing_matrices(rotation_c, gate)
        grad_x = torch.einsum("...bi,bij->...bj", grad_blocks, mixing).flatten(-2).to(x.dtype).contiguous()
    if need_params:
        blocks = x.to(dtype).unflatten(-1, (-1, BLOCK_SIZE))
        outer = torch.einsum("...bi,...bj->bij", grad_blocks, blocks)
        grad_rotation, grad_alpha = _param_grads(outer, rotation_c, gate, rotation.dtype, alpha.dtype)
    return grad_x, grad_rotation, grad_alpha


def _param_grads(outer, rotation, gate, rotation_dtype, alpha_dtype):
    """dR = g S and dα = g(1 − g)⟨S, R − I⟩ from S_b = Σ_tokens dy_b x_bᵀ (shared by every backend)."""
    eye = torch.eye(BLOCK_SIZE, dtype=rotation.dtype, device=rotation.device)
    grad_gate = (outer * (rotation - eye)).sum()
    grad_alpha = gate * (1 - gate) * grad_gate
    return (gate * outer).to(rotation_dtype), grad_alpha.to(alpha_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels: a program owns a [TOKENS, BLOCKS, 8] tile of x. The 8×8 products are broadcast
# multiplies reduced with tl.sum, never tl.dot over a block-diagonal matrix: there a NaN in one
# chunk would leak into the other chunks of the tile through NaN·0, unlike the reference.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_mixing(rotation_ptr, alpha_ptr, block, block_valid):
    """M_b = (1 − g)I + gR_b for the [BLOCKS] chunks of this program, as [BLOCKS, 8, 8] fp32."""
    lane = tl.arange(0, 8)
    row = lane[None, :, None]
    col = lane[None, None, :]
    gate = tl.sigmoid(tl.load(alpha_ptr).to(tl.float32))
    offsets = block[:, None, None] * 64 + row * 8 + col
    rotation = tl.load(rotation_ptr + offsets, mask=block_valid[:, None, None], other=0.0).to(tl.float32)
    return gate * rotation + (1.0 - gate) * (row == col).to(tl.float32)


@triton.jit
def _tile_offsets(token, block, row_stride):
    lane = tl.arange(0, 8)
    return token[:, None, None].to(tl.int64) * row_stride + block[None, :, None] * 8 + lane[None, None, :]


@triton.jit
def _rotate_forward_kernel(
    x_ptr, rotation_ptr, alpha_ptr, y_ptr, stats_ptr,
    num_tokens, num_blocks, x_row_stride,
    TOKENS: tl.constexpr, BLOCKS: tl.constexpr, WITH_STATS: tl.constexpr,
):
    token = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    block = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    block_valid = block < num_blocks
    mask = (token < num_tokens)[:, None, None] & block_valid[None, :, None]
    mixing = _load_mixing(rotation_ptr, alpha_ptr, block, block_valid)

    x = tl.load(x_ptr + _tile_offsets(token, block, x_row_stride), mask=mask, other=0.0).to(tl.float32)
    y = tl.sum(mixing[None, :, :, :] * x[:, :, None, :], axis=3)  # y[t,b,i] = Σ_j M[b,i,j] x[t,b,j]
    y_stored = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + _tile_offsets(token, block, num_blocks * 8), y_stored, mask=mask)

    if WITH_STATS:
        # Measured on the values as stored: an fp16 overflow to inf counts as non-finite.
        value = y_stored.to(tl.float32)
        magnitude = tl.abs(value)
        finite = mask & (magnitude < float("inf"))
        magnitude = tl.where(finite, magnitude, 0.0)
        tl.atomic_add(stats_ptr, tl.sum(tl.sum(tl.sum(magnitude * magnitude, axis=2), axis=1), axis=0))
        tl.atomic_max(stats_ptr + 1, tl.max(tl.max(tl.max(magnitude, axis=2), axis=1), axis=0))
        nonfinite = (mask & ~finite).to(tl.float32)
        tl.atomic_add(stats_ptr + 2, tl.sum(tl.sum(tl.sum(nonfinite, axis=2), axis=1), axis=0))


@triton.jit
def _rotate_backward_kernel(
    grad_y_ptr, x_ptr, rotation_ptr, alpha_ptr, grad_x_ptr, outer_partial_ptr,
    num_tokens, num_blocks, grad_y_row_stride, x_row_stride, tiles_per_program,
    TOKENS: tl.constexpr, BLOCKS: tl.constexpr, NEED_X: tl.constexpr, NEED_PARAMS: tl.constexpr,
):
    chunk = tl.program_id(0)
    block = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    block_valid = block < num_blocks
    mixing = _load_mixing(rotation_ptr, alpha_ptr, block, block_valid)
    outer = tl.zeros((BLOCKS, 8, 8), dtype=tl.float32)
    for tile in range(0, tiles_per_program):
        token = (chunk * tiles_per_program + tile) * TOKENS + tl.arange(0, TOKENS)
        mask = (token < num_tokens)[:, None, None] & block_valid[None, :, None]
        grad_y = tl.load(grad_y_ptr + _tile_offsets(token, block, grad_y_row_stride), mask=mask, other=0.0)
        grad_y = grad_y.to(tl.float32)
        if NEED_X:
            grad_x = tl.sum(mixing[None, :, :, :] * grad_y[:, :, :, None], axis=2)  # Σ_i M[b,i,j] dy[t,b,i]
            grad_x_offsets = _tile_offsets(token, block, num_blocks * 8)
            tl.store(grad_x_ptr + grad_x_offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if NEED_PARAMS:
            x = tl.load(x_ptr + _tile_offsets(token, block, x_row_stride), mask=mask, other=0.0).to(tl.float32)
            outer += tl.sum(grad_y[:, :, :, None] * x[:, :, None, :], axis=0)
    if NEED_PARAMS:
        lane = tl.arange(0, 8)
        offsets = (chunk * num_blocks + block[:, None, None]) * 64 + lane[None, :, None] * 8 + lane[None, None, :]
        tl.store(outer_partial_ptr + offsets, outer, mask=block_valid[:, None, None])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# [16 tokens, 8 chunks] tiles: 16 rows of 64 contiguous values per load, an [16, 8, 8, 8] product.
TOKENS_PER_TILE = 16
BLOCKS_PER_TILE = 8
# The backward sums S_b over tokens in at most 32 chunks per block group, deterministically (no
# atomics): at 4096×3072 fp32 the partial sums are 3 MB against 100 MB of dy and x read.
MAX_TOKEN_CHUNKS = 32


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[..., d] → [N, d] with unit stride along d (a copy only if the input needs one)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rotate_triton(x, rotation, alpha, with_stats: bool = False):
    rows = _rows(x)
    num_tokens, hidden = rows.shape
    num_blocks = hidden // BLOCK_SIZE
    y = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    stats = torch.zeros(NUM_STATS if with_stats else 0, dtype=torch.float32, device=x.device)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, TOKENS_PER_TILE), triton.cdiv(num_blocks, BLOCKS_PER_TILE))
        _rotate_forward_kernel[grid](
            rows, rotation.contiguous(), alpha, y, stats, num_tokens, num_blocks, rows.stride(0),
            TOKENS=TOKENS_PER_TILE, BLOCKS=BLOCKS_PER_TILE, WITH_STATS=with_stats,
        )
    return y.view(x.shape), stats


def rotate_backward_triton(grad_y, x, rotation, alpha, need_x: bool, need_params: bool):
    grad_rows, rows = _rows(grad_y), _rows(x)
    num_tokens, hidden = rows.shape
    num_blocks = hidden // BLOCK_SIZE
    tiles = triton.cdiv(num_tokens, TOKENS_PER_TILE)
    tiles_per_program = max(1, triton.cdiv(tiles, MAX_TOKEN_CHUNKS))
    num_chunks = triton.cdiv(tiles, tiles_per_program) if num_tokens else 0
    grad_x = torch.empty((num_tokens, hidden) if need_x else 0, dtype=x.dtype, device=x.device)
    outer_partial = torch.zeros(
        (num_chunks if need_params else 0, num_blocks, BLOCK_SIZE, BLOCK_SIZE), dtype=torch.float32, device=x.device
    )
    rotation_c = rotation.contiguous()
    if num_chunks and (need_x or need_params):
        _rotate_backward_kernel[(num_chunks, triton.cdiv(num_blocks, BLOCKS_PER_TILE))](
            grad_rows, rows, rotation_c, alpha, grad_x, outer_partial,
            num_tokens, num_blocks, grad_rows.stride(0), rows.stride(0), tiles_per_program,
            TOKENS=TOKENS_PER_TILE, BLOCKS=BLOCKS_PER_TILE, NEED_X=need_x, NEED_PARAMS=need_params,
        )
    grad_rotation, grad_alpha = x.new_empty(0), x.new_empty(0)
    if need_params:
        gate = torch.sigmoid(alpha.to(torch.float32))
        outer = outer_partial.sum(0)
        grad_rotation, grad_alpha = _param_grads(outer, rotation_c.to(torch.float32), gate, rotation.dtype, alpha.dtype)
    return (grad_x.view(x.shape) if need_x else grad_x), grad_rotation, grad_alpha


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
_FORWARD = {
    "torch": rotate_reference,
    "triton": rotate_triton,
    "cpp": lambda x, rotation, alpha, with_stats: torch.ops.so8t_cpp.rotate_forward(x, rotation, alpha, with_stats),
}
_BACKWARD = {
    "torch": rotate_backward_reference,
    "triton": rotate_backward_triton,
    "cpp": lambda *args: torch.ops.so8t_cpp.rotate_backward(*args),
}


@torch.library.custom_op("so8t::so8_rotate", mutates_args=())
def _so8_rotate_op(
    x: torch.Tensor, rotation: torch.Tensor, alpha: torch.Tensor, with_stats: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](x, rotation, alpha, with_stats)


@_so8_rotate_op.register_fake
def _(x, rotation, alpha, with_stats, backend):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, x.new_empty(NUM_STATS if with_stats else 0, dtype=torch.float32)


@torch.library.custom_op("so8t::so8_rotate_backward", mutates_args=())
def _so8_rotate_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, rotation: torch.Tensor, alpha: torch.Tensor,
    need_x: bool, need_params: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad_y, x, rotation, alpha, need_x, need_params)


@_so8_rotate_backward_op.register_fake
def _(grad_y, x, rotation, alpha, need_x, need_params, backend):
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    grad_rotation = torch.empty_like(rotation) if need_params else x.new_empty(0)
    grad_alpha = torch.empty_like(alpha) if need_params else x.new_empty(0)
    return grad_x, grad_rotation, grad_alpha


def _setup_context(ctx, inputs, output):
    x, rotation, alpha, with_stats, backend = inputs
    ctx.save_for_backward(x, rotation, alpha)
    ctx.backend = backend


def _backward(ctx, grad_y, grad_stats):
    # The statistics are measurements of y, not loss terms: their gradient is not propagated.
    x, rotation, alpha = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_rotation, grad_alpha = _so8_rotate_backward_op(
        grad_y, x, rotation, alpha, need_x, need_params, ctx.backend
    )
    return (
        grad_x if need_x else None,
        grad_rotation if ctx.needs_input_grad[1] else None,
        grad_alpha if ctx.needs_input_grad[2] else None,
        None,
        None,
    )


_so8_rotate_op.register_autograd(_backward, setup_context=_setup_context)


def so8_rotate(
    x: torch.Tensor, rotation: torch.Tensor, alpha: torch.Tensor, stats: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x + σ(alpha)(R x − x) per 8-wide chunk of the last dimension of x.

    x: ``[..., d]`` float32/bfloat16/float16 (float64 runs the reference), any strides, d = 8m.
    rotation: ``[m, 8, 8]``; alpha: a 0-d tensor, the gate before the sigmoid. Returns y with x's
    shape and dtype; differentiable w.r.t. x, rotation and alpha. If ``stats`` (float32, shape [3])
    is given, the kernel overwrites it with [Σ y², max |y|, non-finite count] of y as returned
    (sum and max over the finite values), without reading y again.
    """
    check_tensor("x", x)
    check_tensor("rotation", rotation)
    check_tensor("alpha", alpha)
    num_blocks = check_hidden_size("x", x)
    if tuple(rotation.shape) != (num_blocks, BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(
            f"rotation has shape {tuple(rotation.shape)}; expected ({num_blocks}, 8, 8) for x with hidden size {x.shape[-1]}"
        )
    if alpha.dim() != 0:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected a 0-d tensor (one gate per layer)")
    tensors = dict(x=x, rotation=rotation, alpha=alpha)
    if stats is not None:
        check_tensor("stats", stats, dtypes=(torch.float32,))
        if tuple(stats.shape) != (NUM_STATS,):
            raise ValueError(f"stats has shape {tuple(stats.shape)}; expected ({NUM_STATS},)")
        tensors["stats"] = stats
    check_same_device(**tensors)
    backend = "torch" if x.dtype == torch.float64 else _backend.choose_backend("so8_rotate", x.device)
    y, new_stats = _so8_rotate_op(x, rotation, alpha, stats is not None, backend)
    if stats is not None:
        # A measurement: copied without autograd history, so a reused buffer never grows a graph.
        stats.copy_(new_stats.detach())
    return y
