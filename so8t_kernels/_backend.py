"""Which backend runs an op call: decided once per call from the tensor's device and SO8T_BACKEND.

``auto`` never fails: Triton for CUDA tensors, the C++ extension for CPU tensors, and the PyTorch
reference wherever the preferred one cannot run (with one warning per op and reason). An explicit
``SO8T_BACKEND=triton|cpp|torch`` that cannot run raises. Nothing here touches CUDA at import time.
"""

import os
import warnings

import torch

from ._triton import TRITON_IMPORT_ERROR

BACKENDS = ("triton", "cpp", "torch")
OPS = ("so8_exp", "so8_rotate", "logit_stats", "linear_cross_entropy")
ENV_VAR = "SO8T_BACKEND"
_warned: set[tuple[str, str]] = set()


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of: auto, {', '.join(BACKENDS)}")
    return value


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unusable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on tensors of ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if TRITON_IMPORT_ERROR is not None:
            return TRITON_IMPORT_ERROR
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"Triton runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), not {device.type} tensors"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors, not {device.type} tensors"
        from . import _cpp

        return _cpp.why_unavailable()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def preferred_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


def kernels(reference, triton_launcher, cpp_op: str) -> dict:
    """One op's (or its backward's) implementation per backend, as its torch.library op dispatches them.
    ``cpp_op`` names the C++ kernel, looked up at call time: the extension registers it when it loads."""
    return {
        "torch": reference,
        "triton": triton_launcher,
        "cpp": lambda *args: getattr(torch.ops.so8t_cpp, cpp_op)(*args),
    }


def choose_backend(op: str, device: torch.device) -> str:
    requested = requested_backend()
    if requested != "auto":
        why = why_unusable(requested, device)
        if why is not None:
            raise RuntimeError(f"{ENV_VAR}={requested} cannot run {op} on {device.type}: {why}")
        return requested
    preferred = preferred_backend(device)
    why = why_unusable(preferred, device)
    if why is None:
        return preferred
    if (op, why) not in _warned:
        _warned.add((op, why))
        warnings.warn(f"so8t: {op} falls back to the PyTorch backend: {why}", RuntimeWarning, stacklevel=3)
    return "torch"
