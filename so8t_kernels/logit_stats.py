"""Logit statistics in one pass: mean, population std, min, max over the finite entries, and the count
of non-finite entries, accumulated in fp32 or better, with no host sync.

Each program reduces one tile to (count, mean, M2, min, max, non-finite) with the tile still in
registers; the partials merge with Chan's parallel formula in fp64 (a few thousand rows), which keeps
the std accurate when |mean| ≫ std, unlike Σx² − (Σx)²/n.

Order: reference → Triton kernel → launcher → torch.library registration and ``logit_stats``.
"""

import torch

from . import _backend
from ._triton import tl, triton
from ._validate import check_tensor, compute_dtype

NUM_STATS = 5  # mean, std, min, max, non-finite count
NUM_PARTIALS = 6  # count, mean, M2, min, max, non-finite count per tile


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def logit_stats_reference(logits: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(logits.dtype)
    values = logits.reshape(-1).to(dtype)
    finite = torch.isfinite(values)
    count = finite.sum()
    kept = torch.where(finite, values, 0)
    mean = kept.sum(dtype=torch.float64) / count
    centered = torch.where(finite, values - mean.to(dtype), 0)
    std = torch.sqrt((centered * centered).sum(dtype=torch.float64) / count)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=logits.device)
    low = torch.where(finite, values, float("inf")).amin() if values.numel() else nan
    high = torch.where(finite, values, float("-inf")).amax() if values.numel() else nan
    any_finite = count > 0
    low = torch.where(any_finite, low.to(torch.float64), nan)
    high = torch.where(any_finite, high.to(torch.float64), nan)
    nonfinite = (values.numel() - count).to(torch.float64)
    return torch.stack([mean, std, low, high, nonfinite]).to(torch.float32)


def merge_partials(partials: torch.Tensor) -> torch.Tensor:
    """[tiles, 6] (count, mean, M2, min, max, non-finite) → [5], merged in fp64 (Chan et al. 1979)."""
    partials = partials.to(torch.float64)
    count, tile_mean, tile_m2 = partials[:, 0], partials[:, 1], partials[:, 2]
    total = count.sum()
    mean = (count * tile_mean).sum() / total
    m2 = tile_m2.sum() + (count * (tile_mean - mean) ** 2).sum()
    std = torch.sqrt(m2 / total)
    nan = torch.full_like(total, float("nan"))
    low = torch.where(total > 0, partials[:, 3].amin(), nan)
    high = torch.where(total > 0, partials[:, 4].amax(), nan)
    return torch.stack([mean, std, low, high, partials[:, 5].sum()]).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Triton kernel, and the two helpers linear_cross_entropy's row pass shares with it
# ---------------------------------------------------------------------------------------------
@triton.jit
def tile_moments(value, finite):
    """(count, mean, M2, min, max) of a tile's finite values (fp32), reduced while it is in registers."""
    count = tl.sum(finite.to(tl.float32), axis=0)
    mean = tl.sum(tl.where(finite, value, 0.0), axis=0) / tl.maximum(count, 1.0)
    centred = tl.where(finite, value - mean, 0.0)
    m2 = tl.sum(centred * centred, axis=0)
    low = tl.min(tl.where(finite, value, float("inf")), axis=0)
    high = tl.max(tl.where(finite, value, float("-inf")), axis=0)
    return count, mean, m2, low, high


@triton.jit
def store_partials(partial_ptr, index, count, mean, m2, low, high, nonfinite):
    """Row ``index`` of the [rows, NUM_PARTIALS = 6] partials that merge_partials reads: (count, mean,
    M2, min, max, non-finite count)."""
    row = partial_ptr + index * 6
    tl.store(row, count)
    tl.store(row + 1, mean)
    tl.store(row + 2, m2)
    tl.store(row + 3, low)
    tl.store(row + 4, high)
    tl.store(row + 5, nonfinite)


# numel stays specialized: its divisibility by 16 is what lets the masked loads be 128-bit.
@triton.jit
def _logit_stats_partial_kernel(logits_ptr, partial_ptr, numel, TILE: tl.constexpr):
    tile = tl.program_id(0)
    offsets = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
    in_range = offsets < numel
    value = tl.load(logits_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    finite = in_range & (tl.abs(value) < float("inf"))
    count, mean, m2, low, high = tile_moments(value, finite)
    nonfinite = tl.sum((in_range & ~finite).to(tl.float32), axis=0)
    store_partials(partial_ptr, tile, count, mean, m2, low, high, nonfinite)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
# 4096 values per program: 32 per thread at 4 warps; 2048×32064 logits give 16k partial rows (384 KB).
TILE = 4096


def logit_stats_triton(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(-1)
    num_tiles = triton.cdiv(flat.numel(), TILE)
    partials = torch.empty((num_tiles, NUM_PARTIALS), dtype=torch.float32, device=logits.device)
    if num_tiles:
        _logit_stats_partial_kernel[(num_tiles,)](flat, partials, flat.numel(), TILE=TILE)
    return merge_partials(partials)


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
_IMPLEMENTATIONS = _backend.kernels("logit_stats", logit_stats_reference, logit_stats_triton, "logit_stats")


@torch.library.custom_op("so8t::logit_stats", mutates_args=())
def _logit_stats_op(logits: torch.Tensor, backend: str) -> torch.Tensor:
    return _IMPLEMENTATIONS[backend](logits)


@_logit_stats_op.register_fake
def _(logits, backend):
    return logits.new_empty(NUM_STATS, dtype=torch.float32)


def logit_stats(logits: torch.Tensor) -> torch.Tensor:
    """[mean, std, min, max, non-finite count] of ``logits`` (any shape, any float dtype), float32.

    mean, std (population) and min/max are over the finite entries (NaN when there are none). A
    measurement, not differentiable: the input is detached.
    """
    check_tensor("logits", logits)
    backend = "torch" if logits.dtype == torch.float64 else _backend.choose_backend("logit_stats", logits.device)
    return _logit_stats_op(logits.detach(), backend)
