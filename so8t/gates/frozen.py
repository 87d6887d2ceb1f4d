"""One gated layer's gate for inference, as an exported model stores it: θ ``[hidden/8, 28]`` and α ``[]``
(fp32, loaded from the checkpoint, never trained) and R = exp(A(θ)) built once by ``freeze()`` after
loading. Building R per forward would cost more than the gate itself: so8_exp for one SmolLM2 layer
(72 blocks) takes ~77 µs, so8_rotate on 16 decode tokens ~91 µs (2-core CPU, 1 thread).

Used by the exported transformers models (so8t.models.gated) and the vLLM ones (so8t.vllm).
"""

from __future__ import annotations

import torch
from torch import nn

from so8t_kernels import so8_exp, so8_rotate

from .bank import BLOCK_SIZE, THETA_PER_BLOCK

GATE_MODULE = "so8t_gate"  # the gate's name inside its decoder layer: model.layers.N.so8t_gate.theta


class FrozenGate(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        blocks = hidden_size // BLOCK_SIZE
        # dtype given explicitly: model constructors run under a default dtype of bf16/fp16 exports.
        self.theta = nn.Parameter(torch.zeros(blocks, THETA_PER_BLOCK, dtype=torch.float32), requires_grad=False)
        self.alpha = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
        rotation = torch.eye(BLOCK_SIZE, dtype=torch.float32).repeat(blocks, 1, 1)
        self.register_buffer("rotation", rotation, persistent=False)

    @torch.no_grad()
    def freeze(self) -> None:
        """R from the loaded θ; call once the weights are in place."""
        self.rotation = so8_exp(self.theta.float())[0].to(self.theta.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return so8_rotate(hidden, self.rotation, self.alpha)

    def extra_repr(self) -> str:
        return f"blocks={self.theta.shape[0]}"
