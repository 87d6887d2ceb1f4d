"""The shared parameter bank of every gate of a model: one so8_exp call per forward builds all rotations."""

from __future__ import annotations

import torch
from torch import nn

from so8t_kernels import so8_exp

THETA_PER_BLOCK = 28  # so(8) has 8·7/2 generators
BLOCK_SIZE = 8
NUM_ACTIVATION_STATS = 3  # Σ y², max |y|, non-finite count (what so8_rotate writes into `stats`)


class _ZeroGradient(torch.autograd.Function):
    """Identity forward, zero gradient backward: α stays in the graph while frozen (DDP expects a gradient
    for every parameter that requires one) but the gradient it gets is exactly 0."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class SO8TGateBank(nn.Module):
    """θ ``[G, hidden/8, 28]`` and α ``[G]`` for G gated layers, fp32 whatever the model's dtype.

    ``activation_stats`` ``[G, 3]`` receives each gated layer's [Σ y², max |y|, non-finite count] on
    forwards where the handle collects them; it is a buffer so that it follows the model's device.
    """

    def __init__(self, num_gated_layers: int, hidden_size: int, alpha_init: float, theta_init_std: float,
                 device: torch.device | None = None):
        super().__init__()
        num_blocks = hidden_size // BLOCK_SIZE
        theta = torch.zeros(num_gated_layers, num_blocks, THETA_PER_BLOCK, dtype=torch.float32, device=device)
        if theta_init_std > 0:
            theta.normal_(0.0, theta_init_std)
        self.theta = nn.Parameter(theta)
        self.alpha = nn.Parameter(torch.full((num_gated_layers,), float(alpha_init), dtype=torch.float32, device=device))
        stats = torch.zeros(num_gated_layers, NUM_ACTIVATION_STATS, dtype=torch.float32, device=device)
        self.register_buffer("activation_stats", stats, persistent=False)
        self.alpha_frozen = False

    def rotations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """R ``[G, hidden/8, 8, 8]`` and the orthogonality residual ``[G, hidden/8]``: one so8_exp call."""
        return so8_exp(self.theta)

    def gate_logits(self) -> torch.Tensor:
        """α as the forward should use it: with a zero gradient while the annealing schedule owns it."""
        return _ZeroGradient.apply(self.alpha) if self.alpha_frozen else self.alpha

    def extra_repr(self) -> str:
        layers, blocks, _ = self.theta.shape
        return f"gated_layers={layers}, blocks_per_layer={blocks}, alpha_frozen={self.alpha_frozen}"
