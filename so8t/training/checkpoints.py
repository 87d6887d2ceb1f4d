"""Checkpoints of a ``so8t train`` run and resuming from them.

``<output-dir>/checkpoint-<step>/`` holds what the HF Trainer writes (LoRA weights, optimizer, scheduler,
RNG states, trainer_state.json) and what so8t adds: the SO8T gates (``so8t/``), the monitor's records up
to the step (``monitoring/metrics.jsonl``) and ``so8t_checkpoint.json`` (the step and the α-annealing
position). Everything is fsynced before ``so8t_checkpoint.json`` is written, last: a checkpoint without
it was cut short (or its weights were not finite), is never resumed from, and goes at the next rotation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ..durable import fsync_tree, write_synced
from ..errors import SO8TError
from ..gates.adapter import SO8T_ADAPTER_DIR, WEIGHTS_FILE, save_so8t_adapter
from ..gates.placement import SO8THandle
from ..monitor.recorder import METRICS_FILE
from .distributed import local_part, max_over_ranks, wait_for_every_rank, whole_gates
from .outputs import CHECKPOINT_PREFIX, MONITORING_DIR, remove_path

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "so8t_checkpoint.json"
FORMAT_VERSION = 1
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable tensors with a NaN or an infinity (under FSDP, in this rank's shards)."""
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and not torch.isfinite(local_part(parameter.detach())).all()]


def checkpoint_step(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete(path: Path) -> bool:
    return (path / CHECKPOINT_FILE).is_file()


def checkpoints(directory: Path) -> list[Path]:
    """``checkpoint-<step>`` directories in ``directory``, complete or not, oldest step first."""
    if not directory.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in directory.iterdir()]
    return [path for step, path in sorted((s, p) for s, p in found if s is not None)]


def rotate(directory: Path, keep: int) -> None:
    """Keeps the newest ``keep`` complete checkpoints (0: all); removes older ones and every cut-short one."""
    complete = [path for path in checkpoints(directory) if is_complete(path)]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [path for path in checkpoints(directory) if not is_complete(path)]
    for path in doomed:
        remove_path(path)


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """``--resume latest``: the newest complete checkpoint in ``output_dir``; else the directory named."""
    if resume == "latest":
        complete = [path for path in checkpoints(output_dir) if is_complete(path)]
        if not complete:
            raise SO8TError(f"--resume latest: no complete checkpoint in {output_dir}")
        return complete[-1]
    path = Path(resume).resolve()
    if not is_complete(path):
        raise SO8TError(f"--resume {resume}: not a complete so8t checkpoint (no {CHECKPOINT_FILE})")
    return path


class CheckpointCallback(TrainerCallback):
    """Adds the gates, the monitor's records and the annealing position to each checkpoint the Trainer
    saves, marks it complete and rotates (the Trainer's own ``save_total_limit`` is left off: it would
    rotate before the checkpoint is complete)."""

    def __init__(self, handle: SO8THandle | None, monitoring: Path | None, keep: int):
        self.handle = handle
        self.monitoring = monitoring
        self.keep = keep

    def on_save(self, args, state, control, model=None, **kwargs):
        # Every rank: the others' files (rng_state_<rank>.pth, FSDP's shards) are written before rank 0
        # marks the checkpoint complete; all ranks decide alike on finite weights (each checks its own
        # shards) and, under FSDP, all take part in gathering the gates.
        wait_for_every_rank()
        directory = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        bad = nonfinite_parameters(model)
        if max_over_ranks(len(bad), args.device):
            if state.is_world_process_zero:
                logger.warning("so8t: %s not kept: trainable tensors hold NaN or infinity (e.g. %s)",
                               directory.name, bad[0] if bad else "on another rank")
                remove_path(directory)
            return
        with whole_gates(model, self.handle):
            if state.is_world_process_zero:
                self._complete(directory, state.global_step)
                rotate(Path(args.output_dir), self.keep)
        wait_for_every_rank()  # no rank goes on (or ends the run, and has its launcher stop the others) before it

    def _complete(self, directory: Path, step: int) -> None:
        record = {"format_version": FORMAT_VERSION, "step": step}
        if self.handle is not None:
            save_so8t_adapter(self.handle, directory / SO8T_ADAPTER_DIR)
            record["alpha_annealing"] = {"optimizer_steps_done": step,
                                         "warmup_steps": self.handle.config.warmup_steps,
                                         "alpha_frozen": bool(self.handle.bank.alpha_frozen)}
        if self.monitoring is not None and (self.monitoring / METRICS_FILE).is_file():
            (directory / MONITORING_DIR).mkdir(exist_ok=True)
            shutil.copyfile(self.monitoring / METRICS_FILE, directory / MONITORING_DIR / METRICS_FILE)
        fsync_tree(directory)
        write_synced(directory / CHECKPOINT_FILE, json.dumps(record, indent=2) + "\n")


def restore_so8t_state(checkpoint: Path, handle: SO8THandle | None, monitoring: Path | None,
                       is_main: bool) -> None:
    """What the Trainer does not restore itself: the gates (on every rank) and the monitor's records
    (rank 0; the monitor then keeps those up to the checkpoint's step and appends)."""
    record = json.loads((checkpoint / CHECKPOINT_FILE).read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise SO8TError(f"{checkpoint / CHECKPOINT_FILE}: format version {record.get('format_version')!r}, "
                        f"this so8t reads {FORMAT_VERSION}")
    if handle is not None:
        weights = checkpoint / SO8T_ADAPTER_DIR / WEIGHTS_FILE
        if not weights.is_file():
            raise SO8TError(f"--resume {checkpoint}: it has no SO8T gates ({weights}); was it trained with --no-so8t?")
        tensors = load_file(weights)
        with torch.no_grad():
            for name in ("theta", "alpha"):
                parameter = getattr(handle, name)
                if tensors[name].shape != parameter.shape:
                    raise SO8TError(f"--resume {checkpoint}: {name} has shape {tuple(tensors[name].shape)}, "
                                    f"this run's gates {tuple(parameter.shape)}")
                parameter.copy_(tensors[name])
    saved_metrics = checkpoint / MONITORING_DIR / METRICS_FILE
    if is_main and monitoring is not None and saved_metrics.is_file():
        monitoring.mkdir(parents=True, exist_ok=True)
        partial = monitoring / f"{METRICS_FILE}.resumed"
        shutil.copyfile(saved_metrics, partial)
        os.replace(partial, monitoring / METRICS_FILE)
