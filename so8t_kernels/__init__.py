"""so8t_kernels: the ops of so8t.

- ``so8_exp(theta) -> (R, residual)``: SO(8) rotations from 28 so(8) parameters per block, and ‖RᵀR − I‖_F.
- ``so8_rotate(x, R, alpha, stats=None) -> y``: gated block rotation y = x + σ(α)(Rx − x) per 8-wide chunk.
- ``logit_stats(logits) -> [mean, std, min, max, non-finite count]`` in one pass.
- ``linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
  stats=None, chunk_size=None) -> loss``: the cross-entropy of ``hidden @ weight.T + bias`` over chunks
  of tokens, never materialising the [N, V] logits; ``stats`` receives their logit statistics, the
  mean entropy and the top-1 accuracy.

Backends: Triton (CUDA tensors), the C++ extension from csrc/ (CPU tensors), and the PyTorch
reference (everywhere); chosen per call, see ``SO8T_BACKEND`` and ``python -m so8t_kernels.info``.
"""

from ._backend import BACKENDS
from .so8_exp import so8_exp
from .linear_cross_entropy import linear_cross_entropy
from .logit_stats import logit_stats
from .so8_rotate import so8_rotate

__all__ = ["BACKENDS", "so8_exp", "so8_rotate", "logit_stats", "linear_cross_entropy"]
