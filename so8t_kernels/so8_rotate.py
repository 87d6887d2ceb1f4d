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
from ._validate import check_hidden_size, check_same_device, check_stats_buffer, check_tensor, compute_dtype

BLOCK_SIZE = 8
NUM_STATS = 3  # Σ y² over finite y, max |y| over finite y, count of non-finite y


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def mixing_matrices(rotation: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """M_b = (1 − g)I + gR_b."""
    eye = torch.eye(BLOCK_SIZE, dtype=rotation.dtype, device=rotation.device)
    return (1 - gate) * eye + gate * rotation


def activation_stats_reference(y: torch.Tensor) -> torch.Tensor:
    """[Σ y², max |y|, non-finite count] over the values of y as stored, in fp32."""
    values = y.reshape(-1).to(compute_dtype(y.dtype))
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
# Triton kernels. A program owns BLOCKS = 32 chunks (one per lane) and walks token tiles; each thread
# owns whole 8-vectors: it loads x_b with 128-bit loads (two of 4 fp32, or one of 8 16-bit values),
# splits it into its 8 values in registers (tl.reshape + tl.split move no data) and forms each output
# with 8 broadcast FMAs against M_b, which it holds in 64 registers for the whole walk. No value
# crosses lanes in the loop: 0 shuffles, 0 shared-memory round trips (the compile test checks it).
# Products are FMAs, never tl.dot over a block-diagonal matrix: there a NaN in one chunk would leak
# into the other chunks of the tile through NaN·0, unlike the reference.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _split4(v):
    """[T, B, 4] → its 4 columns [T, B]; free, the 4 values sit in one thread."""
    even, odd = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _join4(c0, c1, c2, c3):
    """4 columns [T, B] → [T, B, 4], the inverse of _split4."""
    # join appends the new axis last: [p, q] = c_{2p+q} needs the pairs (c0, c2) and (c1, c3).
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [c0.shape[0], c0.shape[1], 4])


@triton.jit
def _load_vectors(ptr, offsets, mask):
    """The 8-vectors starting at ptr + offsets ([T, B]) as 8 fp32 columns [T, B]."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:  # 8 × 2 bytes: one 128-bit load
        index = tl.arange(0, 8)[None, None, :]
        value = tl.load(ptr + offsets[:, :, None] + index, mask=mask[:, :, None], other=0.0).to(tl.float32)
        low, high = tl.split(tl.permute(tl.reshape(value, [value.shape[0], value.shape[1], 2, 4]), (0, 1, 3, 2)))
        return _split4(low) + _split4(high)
    index = tl.arange(0, 4)[None, None, :]  # 8 × 4 bytes: two 128-bit loads
    low = tl.load(ptr + offsets[:, :, None] + index, mask=mask[:, :, None], other=0.0).to(tl.float32)
    high = tl.load(ptr + offsets[:, :, None] + 4 + index, mask=mask[:, :, None], other=0.0).to(tl.float32)
    return _split4(low) + _split4(high)


@triton.jit
def _as_stored(ptr, columns):
    """8 fp32 columns [T, B] rounded to ptr's dtype, as _store_vectors will write them."""
    out = ()
    for i in tl.static_range(8):
        out = out + (columns[i].to(ptr.dtype.element_ty),)
    return out


@triton.jit
def _store_vectors(ptr, offsets, mask, columns):
    """Stores 8 columns [T, B] (already in ptr's dtype) as the 8-vectors at ptr + offsets."""
    low = _join4(columns[0], columns[1], columns[2], columns[3])
    high = _join4(columns[4], columns[5], columns[6], columns[7])
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        index = tl.arange(0, 8)[None, None, :]
        value = tl.reshape(tl.permute(tl.join(low, high), (0, 1, 3, 2)), [low.shape[0], low.shape[1], 8])
        tl.store(ptr + offsets[:, :, None] + index, value, mask=mask[:, :, None])
    else:
        index = tl.arange(0, 4)[None, None, :]
        tl.store(ptr + offsets[:, :, None] + index, low, mask=mask[:, :, None])
        tl.store(ptr + offsets[:, :, None] + 4 + index, high, mask=mask[:, :, None])


@triton.jit
def _load_mixing(rotation_ptr, alpha_ptr, block, block_valid):
    """M_b = (1 − g)I + gR_b as 64 fp32 values [1, B], row-major (i, j) → i * 8 + j."""
    gate = tl.sigmoid(tl.load(alpha_ptr).to(tl.float32))
    mixing = ()
    for i in tl.static_range(8):
        for j in tl.static_range(8):
            value = gate * tl.load(rotation_ptr + block * 64 + (i * 8 + j), mask=block_valid, other=0.0).to(tl.float32)
            mixing = mixing + ((value + (1.0 - gate)) if i == j else value,)
    return mixing


@triton.jit
def _mix(mixing, vector, TRANSPOSE: tl.constexpr):
    """M v (or Mᵀ v) for 8 columns [T, B]: out_i = Σ_j M[i, j] v_j, 8 FMAs per output."""
    out = ()
    for i in tl.static_range(8):
        acc = (mixing[i] if TRANSPOSE else mixing[i * 8]) * vector[0]
        for j in tl.static_range(1, 8):
            acc += (mixing[j * 8 + i] if TRANSPOSE else mixing[i * 8 + j]) * vector[j]
        out = out + (acc,)
    return out


@triton.jit
def _vector_offsets(token, block, row_vectors):
    """Offsets of the 8-vectors (token, block) in rows of row_vectors 8-vectors: multiples of 8."""
    return (token[:, None].to(tl.int64) * row_vectors + block[None, :]) * 8


# Sizes and strides are not specialized (do_not_specialize): offsets are multiples of 8 elements by
# construction (strides are passed in 8-vectors), which is all the 128-bit accesses need, and each
# kernel compiles once per dtype and flag set instead of once per shape class.
@triton.jit(do_not_specialize=["alpha_ptr", "num_tokens", "num_blocks", "x_row_vectors"])
def _rotate_forward_kernel(
    x_ptr, rotation_ptr, alpha_ptr, y_ptr, stats_sum_ptr, stats_max_ptr, stats_count_ptr,
    num_tokens, num_blocks, x_row_vectors,
    TOKENS: tl.constexpr, BLOCKS: tl.constexpr, WITH_STATS: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    block_valid = block < num_blocks
    mixing = _load_mixing(rotation_ptr, alpha_ptr, block[None, :], block_valid[None, :])
    sum_squares = tl.zeros((TOKENS, BLOCKS), dtype=tl.float32)
    max_abs = tl.zeros((TOKENS, BLOCKS), dtype=tl.float32)
    nonfinite = tl.zeros((TOKENS, BLOCKS), dtype=tl.int32)
    for tile in range(tl.program_id(1), tl.cdiv(num_tokens, TOKENS), tl.num_programs(1)):
        token = tile * TOKENS + tl.arange(0, TOKENS)
        mask = (token < num_tokens)[:, None] & block_valid[None, :]
        x = _load_vectors(x_ptr, _vector_offsets(token, block, x_row_vectors), mask)
        stored = _as_stored(y_ptr, _mix(mixing, x, False))
        _store_vectors(y_ptr, _vector_offsets(token, block, num_blocks), mask, stored)
        if WITH_STATS:
            # Measured on the values as stored: an fp16 overflow to inf counts as non-finite.
            for i in tl.static_range(8):
                magnitude = tl.abs(stored[i].to(tl.float32))
                finite = magnitude < float("inf")
                magnitude = tl.where(mask & finite, magnitude, 0.0)
                sum_squares += magnitude * magnitude
                max_abs = tl.maximum(max_abs, magnitude)
                nonfinite += (mask & ~finite).to(tl.int32)
    if WITH_STATS:
        # One partial per program, reduced in a fixed order by _activation_stats_kernel: no atomics,
        # the same bits every run, and an exact integer count.
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(stats_sum_ptr + program, tl.sum(tl.sum(sum_squares, axis=1), axis=0))
        tl.store(stats_max_ptr + program, tl.max(tl.max(max_abs, axis=1), axis=0))
        tl.store(stats_count_ptr + program, tl.sum(tl.sum(nonfinite, axis=1), axis=0))


@triton.jit(do_not_specialize=["num_partials"])
def _activation_stats_kernel(sum_ptr, max_ptr, count_ptr, stats_ptr, num_partials, CHUNK: tl.constexpr):
    """[Σ y², max |y|, non-finite count] from the forward's per-program partials, in one program."""
    sum_squares = tl.zeros((CHUNK,), dtype=tl.float32)
    max_abs = tl.zeros((CHUNK,), dtype=tl.float32)
    nonfinite = tl.zeros((CHUNK,), dtype=tl.int64)
    for start in range(0, num_partials, CHUNK):
        index = start + tl.arange(0, CHUNK)
        valid = index < num_partials
        sum_squares += tl.load(sum_ptr + index, mask=valid, other=0.0)
        max_abs = tl.maximum(max_abs, tl.load(max_ptr + index, mask=valid, other=0.0))
        nonfinite += tl.load(count_ptr + index, mask=valid, other=0).to(tl.int64)
    tl.store(stats_ptr, tl.sum(sum_squares, axis=0))
    tl.store(stats_ptr + 1, tl.max(max_abs, axis=0))
    tl.store(stats_ptr + 2, tl.sum(nonfinite, axis=0).to(tl.float32))


@triton.jit(do_not_specialize=["alpha_ptr", "num_tokens", "num_blocks", "grad_y_row_vectors", "x_row_vectors"])
def _rotate_backward_kernel(
    grad_y_ptr, x_ptr, rotation_ptr, alpha_ptr, grad_x_ptr, outer_partial_ptr,
    num_tokens, num_blocks, grad_y_row_vectors, x_row_vectors,
    TOKENS: tl.constexpr, BLOCKS: tl.constexpr, STAGES: tl.constexpr,
    NEED_X: tl.constexpr, NEED_PARAMS: tl.constexpr,
):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    block_valid = block < num_blocks
    if NEED_X:
        mixing = _load_mixing(rotation_ptr, alpha_ptr, block[None, :], block_valid[None, :])
    # S_b = Σ_tokens dy_b x_bᵀ: 64 accumulators per thread, one token per thread per tile.
    outer = ()
    for entry in tl.static_range(64):
        outer = outer + (tl.zeros((TOKENS, BLOCKS), dtype=tl.float32),)
    # STAGES tiles in flight through async copies (cp.async on sm_80/sm_90): one token per thread
    # per tile is too little to hide DRAM latency at the ~12 warps per SM that 64 + 64 registers allow.
    for tile in tl.range(tl.program_id(1), tl.cdiv(num_tokens, TOKENS), tl.num_programs(1), num_stages=STAGES):
        token = tile * TOKENS + tl.arange(0, TOKENS)
        mask = (token < num_tokens)[:, None] & block_valid[None, :]
        grad_y = _load_vectors(grad_y_ptr, _vector_offsets(token, block, grad_y_row_vectors), mask)
        if NEED_X:
            grad_x = _as_stored(grad_x_ptr, _mix(mixing, grad_y, True))  # dx_j = Σ_i M[i, j] dy_i
            _store_vectors(grad_x_ptr, _vector_offsets(token, block, num_blocks), mask, grad_x)
        if NEED_PARAMS:
            x = _load_vectors(x_ptr, _vector_offsets(token, block, x_row_vectors), mask)
            updated = ()
            for i in tl.static_range(8):
                for j in tl.static_range(8):
                    updated = updated + (outer[i * 8 + j] + grad_y[i] * x[j],)
            outer = updated
    if NEED_PARAMS:
        # Once per program: the tile's tokens sit in different warps, summed through shared memory.
        row = outer_partial_ptr + (tl.program_id(1) * num_blocks + block).to(tl.int64) * 64
        for entry in tl.static_range(64):
            tl.store(row + entry, tl.sum(outer[entry], axis=0), mask=block_valid)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# 32 chunks per program (one per lane); 4 warps hold 8 forward tokens (2 per thread: 64 B of fp32
# in flight per thread per tile) or 4 backward tokens (1 per thread, 3 tiles in flight).
BLOCKS_PER_PROGRAM = 32
FORWARD_TOKENS_PER_TILE = 8
BACKWARD_TOKENS_PER_TILE = 4
BACKWARD_STAGES = 3
# Programs along the tokens: at most ~8 resident programs on each of 132 SMs (H100) over the 12
# chunk groups of hidden 3072, and at least 8 tiles per program, so that loading M_b (256 B per
# chunk) costs ≤ 1/8 of the tile traffic. Each backward program adds one partial S (hidden × 8
# floats: 98 KB at hidden 3072), 1.3 % of the dy and x it reads at 4096 tokens.
TARGET_PROGRAMS = 1024
MIN_TILES_PER_PROGRAM = 8
STATS_CHUNK = 1024


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[..., d] → [N, d] with unit stride along d and a row stride of whole 8-vectors (a copy only
    if the input needs one)."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    return rows if rows.stride(-1) == 1 and rows.stride(0) % BLOCK_SIZE == 0 else rows.contiguous()


def _grid(num_tokens: int, num_blocks: int, tokens_per_tile: int) -> tuple[int, int]:
    groups = triton.cdiv(num_blocks, BLOCKS_PER_PROGRAM)
    tiles = triton.cdiv(num_tokens, tokens_per_tile)
    return groups, min(triton.cdiv(tiles, MIN_TILES_PER_PROGRAM), max(1, TARGET_PROGRAMS // groups))


def rotate_triton(x, rotation, alpha, with_stats: bool = False):
    rows = _rows(x)
    num_tokens, hidden = rows.shape
    num_blocks = hidden // BLOCK_SIZE
    y = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    stats = torch.zeros(NUM_STATS if with_stats else 0, dtype=torch.float32, device=x.device)
    if num_tokens:
        grid = _grid(num_tokens, num_blocks, FORWARD_TOKENS_PER_TILE)
        num_partials = grid[0] * grid[1] if with_stats else 0
        partial_sum = torch.empty(num_partials, dtype=torch.float32, device=x.device)
        partial_max = torch.empty(num_partials, dtype=torch.float32, device=x.device)
        partial_count = torch.empty(num_partials, dtype=torch.int32, device=x.device)
        _rotate_forward_kernel[grid](
            rows, rotation.contiguous(), alpha, y, partial_sum, partial_max, partial_count,
            num_tokens, num_blocks, rows.stride(0) // BLOCK_SIZE,
            TOKENS=FORWARD_TOKENS_PER_TILE, BLOCKS=BLOCKS_PER_PROGRAM, WITH_STATS=with_stats,
        )
        if with_stats:
            _activation_stats_kernel[(1,)](partial_sum, partial_max, partial_count, stats, num_partials,
                                           CHUNK=STATS_CHUNK)
    return y.view(x.shape), stats


def rotate_backward_triton(grad_y, x, rotation, alpha, need_x: bool, need_params: bool):
    grad_rows, rows = _rows(grad_y), _rows(x)
    num_tokens, hidden = rows.shape
    num_blocks = hidden // BLOCK_SIZE
    grid = _grid(num_tokens, num_blocks, BACKWARD_TOKENS_PER_TILE)
    grad_x = torch.empty((num_tokens, hidden) if need_x else 0, dtype=x.dtype, device=x.device)
    outer_partial = torch.empty(
        (grid[1] if need_params and num_tokens else 0, num_blocks, BLOCK_SIZE, BLOCK_SIZE),
        dtype=torch.float32, device=x.device,
    )
    rotation_c = rotation.contiguous()
    if num_tokens and (need_x or need_params):
        _rotate_backward_kernel[grid](
            grad_rows, rows, rotation_c, alpha, grad_x, outer_partial,
            num_tokens, num_blocks, grad_rows.stride(0) // BLOCK_SIZE, rows.stride(0) // BLOCK_SIZE,
            TOKENS=BACKWARD_TOKENS_PER_TILE, BLOCKS=BLOCKS_PER_PROGRAM, STAGES=BACKWARD_STAGES,
            NEED_X=need_x, NEED_PARAMS=need_params,
        )
    grad_rotation, grad_alpha = x.new_empty(0), x.new_empty(0)
    if need_params:
        gate = torch.sigmoid(alpha.to(torch.float32))
        # The token programs' partials summed in a fixed order: the same bits every run.
        outer = outer_partial.sum(0)
        grad_rotation, grad_alpha = _param_grads(outer, rotation_c.to(torch.float32), gate, rotation.dtype, alpha.dtype)
    return (grad_x.view(x.shape) if need_x else grad_x), grad_rotation, grad_alpha


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
_FORWARD = _backend.kernels("so8_rotate", rotate_reference, rotate_triton, "rotate_forward")
_BACKWARD = _backend.kernels(
    "so8_rotate", rotate_backward_reference, rotate_backward_triton, "rotate_backward"
)


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
        check_stats_buffer(stats, NUM_STATS)
        tensors["stats"] = stats
    check_same_device(**tensors)
    backend = "torch" if x.dtype == torch.float64 else _backend.choose_backend("so8_rotate", x.device)
    y, new_stats = _so8_rotate_op(x, rotation, alpha, stats is not None, backend)
    if stats is not None:
        # A measurement: copied without autograd history, so a reused buffer never grows a graph.
        stats.copy_(new_stats.detach())
    return y
