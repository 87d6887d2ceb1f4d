"""Checks on a multi-process launch, made before anything is loaded or written."""

from __future__ import annotations

import os

from ..errors import SO8TError

FSDP_SWITCH = "ACCELERATE_USE_FSDP"  # set by `accelerate launch --use_fsdp` (or its config file)


def check_sharding(on_cpu: bool) -> None:
    """Refuses an FSDP launch that would silently become plain data parallelism.

    so8t trains on CPU when no CUDA device is visible, and accelerate 1.x picks FSDP only for accelerator
    processes: CPU processes always get its MULTI_CPU type (DDP over gloo) and the FSDP request is dropped
    without a word, so every rank would hold the whole model, the opposite of what the user asked for.
    """
    if on_cpu and os.environ.get(FSDP_SWITCH, "false").lower() == "true":
        raise SO8TError("FSDP was requested (accelerate launch --use_fsdp), but accelerate shards models only on "
                        "GPUs and runs CPU processes as MULTI_CPU, each with the whole model; launch without "
                        "--use_fsdp on CPU (data parallel over gloo)")
