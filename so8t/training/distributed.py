"""Multi-process runs (torchrun, accelerate launch): the check on a launch made before anything is
loaded, and the collectives so8t adds to the Trainer's. Each is a no-op in a single process."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from ..errors import SO8TError

FSDP_SWITCH = "ACCELERATE_USE_FSDP"  # set by `accelerate launch --use_fsdp` (or its config file)
FSDP_VERSION = "FSDP_VERSION"  # set by `accelerate launch --fsdp_version`, "1" without it


def check_sharding(on_cpu: bool) -> None:
    """Refuses an FSDP launch that would silently become plain data parallelism.

    so8t trains on CPU when no CUDA device is visible, and accelerate 1.x picks FSDP only for accelerator
    processes: CPU processes always get its MULTI_CPU type (DDP over gloo) and the FSDP request is dropped
    without a word, so every rank would hold the whole model, the opposite of what the user asked for.
    """
    if os.environ.get(FSDP_SWITCH, "false").lower() != "true":
        return
    if on_cpu:
        raise SO8TError("FSDP was requested (accelerate launch --use_fsdp), but accelerate shards models only on "
                        "GPUs and runs CPU processes as MULTI_CPU, each with the whole model; launch without "
                        "--use_fsdp on CPU (data parallel over gloo)")
    # peft picks the adapter's tensors by module name and sees through the outermost FSDP1 unit only: with
    # the decoder layers wrapped, the final adapter would be saved empty.
    if os.environ.get(FSDP_VERSION, "1") != "2":
        raise SO8TError("so8t train shards with FSDP2 only: launch with accelerate launch --use_fsdp "
                        "--fsdp_version 2 (with FSDP1 peft cannot save the LoRA adapter of a wrapped model)")


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


def end_process_group() -> None:
    """Destroys the launcher's process group while the interpreter is whole. Left to the interpreter's exit,
    gloo's threads may still hold work whose tensors need the GIL, and the process aborts ("terminate called
    without an active exception", SIGABRT; seen in this project's CPU tests of two ranks), after which torchrun
    stops the other ranks. The train command calls it however it ends; a program that calls the tasks itself
    should too. Imports nothing: without torch.distributed loaded there is no group to end."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_for_every_rank() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def whole_trainable_state(model) -> dict | None:
    """Under FSDP2, the model's trainable tensors (LoRA, gates) whole on every rank, by their names in the
    unsharded model: its own state dict holds DTensor shards, which a safetensors writer cannot save. An
    all-gather: every rank calls it. None when nothing is sharded (one process, DDP)."""
    if not _distributed() or not any(hasattr(parameter, "full_tensor") for parameter in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))


def local_part(tensor):
    """This rank's shard of an FSDP2 DTensor (reading the whole one would be a collective), else ``tensor``."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextlib.contextmanager
def whole_gates(model, handle) -> Iterator[None]:
    """Within the block ``handle.theta`` and ``handle.alpha`` are the whole gate tensors on every rank.

    FSDP shards them outside forward passes: FSDP2 (``fully_shard``) as DTensors, gathered here with
    ``full_tensor()`` in the dtype they are trained in (FSDP2's own unshard gives its compute dtype, bf16
    under mixed precision) and swapped in for the block; FSDP1 as pieces of a flat parameter, gathered
    by ``summon_full_params``. An all-gather: every rank enters, also those that write nothing. In one
    process and under DDP (whole parameters everywhere) it does nothing."""
    if handle is None or not _distributed():
        yield
        return
    from torch import nn

    bank = handle.bank
    shards = {name: parameter for name, parameter in bank.named_parameters(recurse=False)
              if hasattr(parameter, "full_tensor")}
    if shards:
        for name, shard in shards.items():
            setattr(bank, name, nn.Parameter(shard.full_tensor(), requires_grad=shard.requires_grad))
        try:
            yield
        finally:
            for name, shard in shards.items():
                setattr(bank, name, shard)
        return
    owner = _fsdp1_owner(model if model is not None else handle.model, bank)
    if owner is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(owner, recurse=False, writeback=False):
        yield


def _fsdp1_owner(model, bank):
    """The innermost FSDP1 unit whose flat parameter holds the gate bank's parameters, or None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    owners = [module for module in model.modules()
              if isinstance(module, FullyShardedDataParallel) and any(sub is bank for sub in module.modules())]
    return owners[-1] if owners else None  # modules() lists a unit before the units inside it
