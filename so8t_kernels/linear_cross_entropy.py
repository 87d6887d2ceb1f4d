"""Cross-entropy of a linear layer's output without the logits tensor, plus the logit statistics.

``loss = CE(hidden @ weightᵀ + bias, labels)`` computed over chunks of tokens: a chunk's logits
[C, V] are made by one matmul, reduced row by row (log-sum-exp in fp32, loss, entropy, top-1,
logit statistics) and overwritten in place by their gradient (softmax − one-hot) · scale, which two
more matmuls turn into the chunk's dL/dhidden and its share of dL/dweight. No [N, V] tensor ever
exists: at N = 4096, V = 49,152 the logits alone would be 805 MB in fp32, a chunk of 256 tokens 50 MB.

For ``reduction`` "mean" and "sum" the gradients are computed during the forward (the loss is a
scalar, so its gradient is one number that the backward only multiplies in): three matmuls per
chunk in all, as many as the materialised path (logits, dhidden, dweight), and dweight only when the
weight requires grad. For "none" the backward reruns the chunks with the per-token gradient as scale.

Semantics (every backend computes exactly this):
- logits z = hidden @ weightᵀ + bias in the input dtype (what the model's LM head produces), then fp32
  (fp64 for fp64 inputs) for everything after: lse = m + log Σ_j exp(z_j − m), m = max_j z_j.
- loss of a token = lse − z[label]; tokens whose label is ``ignore_index`` give 0 and no gradient.
  "mean" divides the sum by the number of non-ignored tokens (all ignored: 0, not NaN); "none" returns
  [N]. The loss is fp32 (fp64 for fp64 inputs) whatever the input dtype.
- a non-ignored token whose logit row holds any non-finite value gets a NaN loss, entropy and gradient
  row (F.cross_entropy would give a finite loss for a row with only −inf entries: a linear layer makes
  those only from overflowing inputs, a divergence this reports instead of hiding).
- stats (float32 [7]): [0:5] = mean, std (population), min, max over the finite logits of all N × V
  entries, and their non-finite count: exactly ``logit_stats`` of the materialised logits (in the input
  dtype), ignored tokens included. [5] entropy: mean over non-ignored tokens of −Σ_j p_j log p_j in nats,
  p = softmax(z). [6] top-1 accuracy: fraction of non-ignored tokens whose label's logit equals the row
  maximum (a tie counts as correct; a row with a non-finite logit never does). [5] and [6] are NaN when
  every token is ignored.

Order: reference → Triton kernel → launchers → torch.library registration and ``linear_cross_entropy``.
"""

import math

import torch

from . import _backend
from ._triton import tl, triton
from ._validate import check_same_device, check_stats_buffer, check_tensor, compute_dtype
from .logit_stats import NUM_PARTIALS, merge_partials, store_partials, tile_moments

NUM_STATS = 7  # logit mean, std, min, max, non-finite count; entropy; top-1 accuracy
REDUCTIONS = ("none", "mean", "sum")
# A chunk's logits hold at most 2^24 values (64 MB in fp32).
CHUNK_LOGITS = 1 << 24


def default_chunk_size(hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk C: the largest power of two with C ≤ H (the chunk's logits [C, V] take no more
    memory than the LM head's weight [V, H]) and C·V ≤ 2^24, between 16 and 1024. Rows are what BLAS
    needs: each chunk streams the weight twice (logits, dhidden), so C sets the matmuls' FLOPs per byte
    of weight; measured at H = 3072, V = 32,064 on a 2-core CPU, chunks of 128 rows made the matmuls
    1.6× slower than one unchunked matmul, 512 rows 1.1×. C = 256 at H = 576, V = 49,152; 512 at
    H = 3072, V = 32,064."""
    rows = min(hidden_size, CHUNK_LOGITS // max(vocab_size, 1))
    return int(min(1024, max(16, 1 << int(math.log2(max(rows, 1))))))


# ---------------------------------------------------------------------------------------------
# Reference: the same chunked algorithm in torch ops. Runs anywhere (the fallback backend), and in
# float64 it is the oracle's twin; the tests' oracle materialises the logits instead.
# ---------------------------------------------------------------------------------------------
def chunk_logits(hidden_chunk, weight, bias):
    """[C, V] logits in the input dtype: what the model's LM head would return for these tokens."""
    if bias is None:
        return hidden_chunk @ weight.T
    return torch.addmm(bias, hidden_chunk, weight.T)


def row_partials(values, finite):
    """[C, 6]: (count, mean, M2, min, max, non-finite count) of each row's finite values."""
    count = finite.sum(dim=1).to(values.dtype)
    row_mean = torch.where(finite, values, 0).sum(dim=1) / count.clamp_min(1)
    centred = torch.where(finite, values - row_mean[:, None], 0)
    return torch.stack([
        count, row_mean, (centred * centred).sum(dim=1),
        torch.where(finite, values, float("inf")).amin(dim=1),
        torch.where(finite, values, float("-inf")).amax(dim=1),
        values.shape[1] - count,
    ], dim=1)


def rows_reference(logits, labels, valid, scale, write_grad: bool, with_stats: bool):
    """Per-row reduction of one chunk's logits [C, V] (input dtype), in fp32/fp64.

    Returns (loss [C], entropy [C], correct [C], row partials [C, 6] or None without ``with_stats``)
    and, with ``write_grad``, the gradient (softmax − one-hot) · scale in the logits' dtype (zero rows
    for ignored tokens).
    """
    values = logits.to(compute_dtype(logits.dtype))
    finite = torch.isfinite(values)
    all_finite = finite.all(dim=1)
    partials = row_partials(values, finite) if with_stats else None

    # Rows holding a non-finite value are NaN by definition (masked at the end), so no pass guards
    # inf − inf here: ~8 passes over the chunk, in place where the values are not needed again.
    nan = torch.full_like(values[:, 0], float("nan"))
    row_max = values.amax(dim=1, keepdim=True)
    in_vocab = (labels >= 0) & (labels < values.shape[1])
    if values.device.type == "cpu" and not bool((in_vocab | ~valid).all()):  # a sync only on CPU, where it is free
        raise IndexError(f"labels must lie in [0, {values.shape[1]}) or equal ignore_index")
    target = labels.where(in_vocab, 0)[:, None]
    target_logit = values.gather(1, target)[:, 0]
    shifted = values - row_max
    log_total = torch.logsumexp(shifted, dim=1)
    probs = torch.softmax(shifted, dim=1)
    weighted = torch.bmm(probs[:, None, :], shifted[:, :, None])[:, 0, 0]  # Σ p·(z − max), no [C, V] temporary
    row_finite = all_finite & in_vocab  # out-of-vocabulary labels (CUDA only) give NaN like non-finite rows
    loss = torch.where(valid, torch.where(row_finite, log_total + row_max[:, 0] - target_logit, nan), 0)
    entropy = torch.where(all_finite, log_total - weighted, nan)
    correct = valid & row_finite & (target_logit == row_max[:, 0])

    grad = None
    if write_grad:
        grad = probs.scatter_add_(1, target, -torch.ones_like(target_logit)[:, None])
        grad.mul_(scale.to(values.dtype)[:, None])
        grad.masked_fill_(~row_finite[:, None], float("nan")).masked_fill_(~valid[:, None], 0)
        grad = grad.to(logits.dtype)
    return loss, entropy, correct, partials, grad


def token_scales(labels, valid, reduction: str, grad_scale):
    """Per-token factor of the gradient: 1/count ("mean"), 1 ("sum"), the incoming dL/dloss ("none")."""
    if grad_scale is not None:
        return grad_scale.reshape(-1).expand(labels.shape[0])
    if reduction == "mean":
        return (1.0 / valid.sum().clamp_min(1).to(torch.float64)).expand(labels.shape[0])
    return torch.ones((), dtype=torch.float64, device=labels.device).expand(labels.shape[0])


def finish(loss, entropy, correct, partials, valid, reduction: str, with_stats: bool, dtype):
    """Per-token results → (loss as reduced, stats [7] or an empty tensor)."""
    count = valid.sum()
    if reduction == "none":
        reduced = loss.to(dtype)
    else:
        reduced = loss.sum(dtype=torch.float64)
        if reduction == "mean":
            reduced = reduced / count.clamp_min(1)
        reduced = reduced.to(dtype)
    if not with_stats:
        return reduced, loss.new_empty(0, dtype=torch.float32)
    if partials.shape[0]:
        logit = merge_partials(partials)
    else:  # no tokens: no logits, as logit_stats of an empty tensor says
        logit = torch.tensor([float("nan")] * 4 + [0.0], device=loss.device)
    mean_entropy = torch.where(valid, entropy.to(torch.float64), 0).sum() / count
    accuracy = correct.sum(dtype=torch.float64) / count
    return reduced, torch.cat([logit, torch.stack([mean_entropy, accuracy]).to(torch.float32)])


def chunked(rows_fn, hidden, weight, bias, labels, ignore_index: int, reduction: str, grad_scale,
            with_stats: bool, need_hidden: bool, need_weight: bool, need_bias: bool, chunk_size: int):
    """The chunk loop shared by the torch and Triton backends; ``rows_fn`` reduces one chunk."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    valid = labels != ignore_index
    scale = token_scales(labels, valid, reduction, grad_scale)
    write_grad = need_hidden or need_weight or need_bias
    loss = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    entropy = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    correct = torch.empty(num_tokens, dtype=torch.int8, device=hidden.device)
    partials = torch.empty((num_tokens if with_stats else 0, NUM_PARTIALS), dtype=dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    # dweight and dbias sum over every chunk: accumulated in fp32 (fp64), cast once at the end.
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if need_bias else None
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        hidden_chunk = hidden[start:end]
        logits = chunk_logits(hidden_chunk, weight, bias)
        out = rows_fn(logits, labels[start:end], valid[start:end], scale[start:end], write_grad, with_stats)
        loss[start:end], entropy[start:end], correct[start:end], chunk_partials, grad = out
        if with_stats:
            partials[start:end] = chunk_partials
        if need_hidden:
            torch.mm(grad, weight, out=grad_hidden[start:end])
        if need_weight:
            grad_weight += (grad.T @ hidden_chunk).to(dtype)
        if need_bias:
            grad_bias += grad.to(dtype).sum(dim=0)
    reduced, stats = finish(loss, entropy, correct, partials, valid, reduction, with_stats, dtype)
    grad_weight = grad_weight.to(weight.dtype) if need_weight else weight.new_empty(0)
    grad_bias = grad_bias.to(bias.dtype) if need_bias else weight.new_empty(0)
    return reduced, stats, grad_hidden, grad_weight, grad_bias


def linear_cross_entropy_reference(*args):
    return chunked(rows_reference, *args)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per row of a chunk's logits. The matmuls stay in cuBLAS; this pass
# reads the row once for the reduction (online max / Σ exp / Σ exp·(z − m) and the row's Welford
# statistics, tile by tile) and, for the gradient, once more to overwrite it with (p − 1[j = y])·s.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rows_kernel(
    logits_ptr, labels_ptr, valid_ptr, scale_ptr, loss_ptr, entropy_ptr, correct_ptr, partial_ptr,
    vocab, row_stride, scale_stride,
    BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, WITH_STATS: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    label = tl.load(labels_ptr + row)
    valid = tl.load(valid_ptr + row) != 0
    lanes = tl.arange(0, BLOCK)

    # Running (count, mean, M2) over finite values merged tile by tile with Chan's formula; the
    # softmax sums are kept relative to the running max m of the finite values.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    low = float("inf")
    high = float("-inf")
    nonfinite = 0.0
    row_max = float("-inf")
    total = 0.0
    weighted = 0.0  # Σ exp(z − m)(z − m)
    for start in range(0, vocab, BLOCK):
        offsets = start + lanes
        in_range = offsets < vocab
        z = tl.load(row_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
        finite = in_range & (tl.abs(z) < float("inf"))
        tile_high = tl.max(tl.where(finite, z, float("-inf")), axis=0)
        # The loss needs the non-finite count too (such a row's loss is NaN); the rest only for stats.
        nonfinite += tl.sum((in_range & ~finite).to(tl.float32), axis=0)
        if WITH_STATS:
            tile_count, tile_mean, tile_m2, tile_low, _ = tile_moments(z, finite)
            merged = count + tile_count
            delta = tile_mean - mean
            mean = mean + delta * tile_count / tl.maximum(merged, 1.0)
            m2 = m2 + tile_m2 + delta * delta * count * tile_count / tl.maximum(merged, 1.0)
            count = merged
            low = tl.minimum(low, tile_low)
            high = tl.maximum(high, tile_high)

        new_max = tl.maximum(row_max, tile_high)
        rescale = tl.exp(row_max - new_max)  # exp(−inf) = 0 on the first tile
        shifted = tl.where(finite, z - new_max, 0.0)
        exps = tl.where(finite, tl.exp(shifted), 0.0)
        # Σ e·(z − m_new) = rescale·(Σ_old e·(z − m_old) + (m_old − m_new)·Σ_old e) + this tile's.
        shift_old = tl.where(total > 0.0, row_max - new_max, 0.0)
        weighted = rescale * (weighted + shift_old * total) + tl.sum(exps * shifted, axis=0)
        total = rescale * total + tl.sum(exps, axis=0)
        row_max = new_max

    in_vocab = (label >= 0) & (label < vocab)
    target = tl.load(row_ptr + tl.where(in_vocab, label, 0)).to(tl.float32)
    row_finite = nonfinite == 0.0
    log_total = tl.log(total)
    loss = tl.where(row_finite & in_vocab, log_total + row_max - target, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(entropy_ptr + row, tl.where(row_finite, log_total - weighted / total, float("nan")))
    tl.store(correct_ptr + row, (valid & row_finite & in_vocab & (target == row_max)).to(tl.int8))
    if WITH_STATS:
        store_partials(partial_ptr, row, count, mean, m2, low, high, nonfinite)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        lse = row_max + log_total
        for start in range(0, vocab, BLOCK):
            offsets = start + lanes
            in_range = offsets < vocab
            z = tl.load(row_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - (offsets == label).to(tl.float32)
            grad = tl.where(row_finite & in_vocab, grad * scale, float("nan"))
            grad = tl.where(valid, grad, 0.0)
            tl.store(row_ptr + offsets, grad.to(logits_ptr.dtype.element_ty), mask=in_range)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# 2048 fp32 values per tile: 16 per thread at 4 warps; a 32,064-entry row takes 16 tiles.
BLOCK_V = 2048


def rows_triton(logits, labels, valid, scale, write_grad: bool, with_stats: bool):
    rows, vocab = logits.shape
    dtype = torch.float32
    loss = torch.empty(rows, dtype=dtype, device=logits.device)
    entropy = torch.empty(rows, dtype=dtype, device=logits.device)
    correct = torch.empty(rows, dtype=torch.int8, device=logits.device)
    # Without statistics the kernel never touches the partials: one row keeps the pointer valid.
    partials = torch.empty((rows if with_stats else 1, NUM_PARTIALS), dtype=dtype, device=logits.device)
    scale = scale.to(torch.float32)
    if rows:
        _rows_kernel[(rows,)](
            logits, labels, valid.to(torch.int8), scale, loss, entropy, correct, partials,
            vocab, logits.stride(0), scale.stride(0),
            BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), WRITE_GRAD=write_grad, WITH_STATS=with_stats,
        )
    return loss, entropy, correct, partials if with_stats else None, logits if write_grad else None


def linear_cross_entropy_triton(*args):
    return chunked(rows_triton, *args)


# ---------------------------------------------------------------------------------------------
# Registration and public API
# ---------------------------------------------------------------------------------------------
_IMPLEMENTATIONS = _backend.kernels(
    "linear_cross_entropy", linear_cross_entropy_reference, linear_cross_entropy_triton, "linear_cross_entropy"
)


@torch.library.custom_op("so8t::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    ignore_index: int, reduction: str, grad_scale: torch.Tensor | None, with_stats: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool, chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLEMENTATIONS[backend](
        hidden, weight, bias, labels, ignore_index, reduction, grad_scale, with_stats,
        need_hidden, need_weight, need_bias, chunk_size,
    )


@_lce_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, grad_scale, with_stats,
      need_hidden, need_weight, need_bias, chunk_size, backend):
    dtype = compute_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=dtype)
    stats = hidden.new_empty(NUM_STATS if with_stats else 0, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    return loss, stats, grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, reduction, _, _, need_hidden, need_weight, need_bias, chunk_size, backend = inputs
    _, _, grad_hidden, grad_weight, grad_bias = output
    ctx.reduction = reduction
    ctx.needs = (need_hidden, need_weight, need_bias)
    if reduction == "none":  # the backward reruns the chunks with dL/dloss[i] as token i's scale
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.rerun = (ignore_index, chunk_size, backend)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, *_unused_grads_of_stats_and_saved_gradients):
    need_hidden, need_weight, need_bias = ctx.needs
    if ctx.reduction == "none":
        hidden, weight, bias, labels = ctx.saved_tensors
        ignore_index, chunk_size, backend = ctx.rerun
        _, _, grad_hidden, grad_weight, grad_bias = _lce_op(
            hidden, weight, bias, labels, ignore_index, "none", grad_loss.contiguous(), False,
            need_hidden, need_weight, need_bias, chunk_size, backend,
        )
    else:
        grad_hidden, grad_weight, grad_bias = (
            grad * grad_loss.to(grad.dtype) if grad.numel() else grad for grad in ctx.saved_tensors
        )
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        *[None] * 10,
    )


_lce_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(hidden, weight, labels, bias, reduction, stats, chunk_size):
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("labels", labels, dtypes=(torch.int64, torch.int32))
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.shape[1] == 0:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} and weight {tuple(weight.shape)}; expected [N, H] and [V, H] with H > 0"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected a vocabulary of at least one entry")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, hidden {hidden.dtype}; they must match")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({hidden.shape[0]},), one per row of hidden")
    tensors = dict(hidden=hidden, weight=weight, labels=labels)
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"bias has shape {tuple(bias.shape)} and dtype {bias.dtype}; expected ({weight.shape[0]},) {weight.dtype}")
        tensors["bias"] = bias
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    if stats is not None:
        check_stats_buffer(stats, NUM_STATS)
        tensors["stats"] = stats
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}; expected a positive int or None")
    check_same_device(**tensors)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", stats: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without materialising the logits.

    hidden ``[N, H]``, weight ``[V, H]`` (same float dtype; float64 runs the reference), labels ``[N]``
    int64/int32 in [0, V) or ``ignore_index``, bias ``[V]`` or None. Returns the loss in fp32 (fp64 for
    fp64 inputs): a 0-d tensor for "mean" (over non-ignored tokens; 0 when all are ignored) and "sum",
    [N] for "none". Differentiable w.r.t. hidden, weight and bias; only the gradients that are required
    are computed. ``stats`` (float32 [7]), if given, is overwritten with [logit mean, std, min, max,
    non-finite count, mean entropy, top-1 accuracy] (see the module docstring); without it no statistics
    work is done. ``chunk_size``: tokens per chunk, default from H and V (``default_chunk_size``).
    A label outside [0, V) raises on CPU and gives a NaN loss on CUDA.
    """
    _check_inputs(hidden, weight, labels, bias, reduction, stats, chunk_size)
    backend = "torch" if hidden.dtype == torch.float64 else _backend.choose_backend("linear_cross_entropy", hidden.device)
    grad = torch.is_grad_enabled()
    need_bias = bias is not None and grad and bias.requires_grad
    chunk = chunk_size or default_chunk_size(hidden.shape[1], weight.shape[0])
    loss, new_stats, _, _, _ = _lce_op(
        hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.long().contiguous(),
        int(ignore_index), reduction, None, stats is not None,
        grad and hidden.requires_grad, grad and weight.requires_grad, need_bias, chunk, backend,
    )
    if stats is not None:
        stats.copy_(new_stats.detach())
    return loss
