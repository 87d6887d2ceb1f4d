"""Multi-process runs (torchrun, accelerate launch): the check on a launch made before anything is
loaded, and the collectives so8t adds to the Trainer's. Each is a no-op in a single process."""

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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def max_over_ranks(value: int, device) -> int:
    """The largest ``value`` of all ranks (an all-reduce: every rank calls it at the same point)."""
    if not _distributed():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def wait_for_every_rank() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()
