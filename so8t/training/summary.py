"""The lines ``so8t train`` ends with: the gates' state and what was written where. Names as the monitor
and ``so8t report`` use them (``max ‖θ_b‖``, layer lists), so one number has one name."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import SO8T_ADAPTER_DIR
from ..monitor.schema import METRIC, format_layers
from ..placement import SO8THandle


def gate_summary(handle: SO8THandle) -> str:
    gates = torch.sigmoid(handle.alpha.detach().float()).cpu()
    # Per layer, the largest block's ‖θ_b‖₂: the monitor's theta_norm_max.
    largest = torch.linalg.vector_norm(handle.theta.detach().float(), dim=-1).amax(dim=1).cpu()
    label = METRIC["theta_norm_max"].label
    return (f"gates on layers {format_layers(handle.layer_indices)}: σ(α) {gates.min():.3f} … {gates.max():.3f}, "
            f"{label} {largest.min():.3f} … {largest.max():.3f} (θ_b: one 8-wide block's 28 parameters)")


def outputs_summary(output_dir: Path, gated: bool, monitored: bool) -> str:
    written = ["LoRA adapter (adapter_model.safetensors)"]
    written += [f"SO8T adapter ({SO8T_ADAPTER_DIR}/)"] if gated else []
    written += ["tokenizer", "trainer_state.json"]
    written += ["monitoring/ (see so8t report)"] if monitored else []
    return f"outputs in {output_dir}: {', '.join(written)}" + ("" if gated else "; no gates (--no-so8t)")
