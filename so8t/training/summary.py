"""The lines ``so8t train`` ends with: the gates' state and what was written where. Names as the monitor
and ``so8t report`` use them (``max ‖θ_b‖``, layer lists), so one number has one name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..gates.adapter import SO8T_ADAPTER_DIR
from ..monitor.recorder import METRICS_FILE
from ..monitor.schema import METRIC, format_layers
from .outputs import MONITORING_DIR

if TYPE_CHECKING:
    from ..gates.placement import SO8THandle


def gate_summary(handle: SO8THandle) -> str:
    import torch

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
    kept = _complete_checkpoints(output_dir)
    written += [f"checkpoints {', '.join(kept)} (--resume)"] if kept else []
    return f"outputs in {output_dir}: {', '.join(written)}" + ("" if gated else "; no gates (--no-so8t)")


def _complete_checkpoints(output_dir: Path) -> list[str]:
    from .checkpoints import checkpoints, is_complete

    return [path.name for path in checkpoints(output_dir) if is_complete(path)]


def interrupted_summary(output_dir: Path, save_steps: int, interruption: KeyboardInterrupt | None = None) -> str:
    """After Ctrl-C, SIGTERM or SIGINT: what stopped the run (a TrainingInterrupted says) and what it kept
    in ``output_dir`` (the monitoring so far, complete checkpoints)."""
    what = getattr(interruption, "what", "interrupted")
    kept = []
    if (output_dir / MONITORING_DIR / METRICS_FILE).is_file():
        kept.append(f"{MONITORING_DIR}/ (so8t report {output_dir})")
    complete = _complete_checkpoints(output_dir)
    if complete:
        kept.append(f"{', '.join(complete)} (--resume latest continues from {complete[-1]})")
    elif save_steps:
        kept.append(f"no checkpoint yet (every {save_steps} steps, --save-steps)")
    if not kept:
        return f"so8t train: {what}; nothing kept in {output_dir}"
    return f"so8t train: {what}; kept in {output_dir}: {'; '.join(kept)}"
