"""Input checks shared by the ops (each error names the argument, its shape or dtype, and what was
expected), and the dtype their math runs in."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every input dtype but fp64, which keeps fp64 (the reference as the tests' oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, value, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(value.dtype).removeprefix('torch.')}; expected one of {allowed}")


def check_stats_buffer(stats: torch.Tensor, num_stats: int) -> None:
    """An op's optional ``stats`` output buffer: float32 of shape [num_stats]."""
    check_tensor("stats", stats, dtypes=(torch.float32,))
    if tuple(stats.shape) != (num_stats,):
        raise ValueError(f"stats has shape {tuple(stats.shape)}; expected ({num_stats},)")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_hidden_size(name: str, x: torch.Tensor) -> int:
    if x.dim() == 0 or x.shape[-1] % 8 != 0 or x.shape[-1] == 0:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; its last dimension (hidden size) must be a positive "
            f"multiple of 8 to split into SO(8) blocks"
        )
    return x.shape[-1] // 8
