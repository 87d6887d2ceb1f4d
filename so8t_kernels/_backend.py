"""Which backend runs an op call: decided once per call from the tensor's device and SO8T_BACKEND.

``auto`` never fails: Triton for CUDA tensors, the C++ extension for CPU tensors, and the PyTorch
reference wherever the preferred one cannot run (with one warning per op and reason), including an
op whose Triton kernel failed to compile or launch (older Triton, ptxas error). An explicit
``SO8T_BACKEND=triton|cpp|torch`` that cannot run raises. Nothing here touches CUDA at import time.
"""

import functools
import os
import warnings

import torch

from ._triton import TRITON_IMPORT_ERROR, TRITON_VERSION

BACKENDS = ("triton", "cpp", "torch")
OPS = ("so8_exp", "so8_rotate", "logit_stats", "linear_cross_entropy")
ENV_VAR = "SO8T_BACKEND"
_warned: set[tuple[str, str]] = set()
_triton_failures: dict[str, str] = {}  # op → why auto no longer runs its Triton kernels


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


def kernels(op: str, reference, triton_launcher, cpp_op: str) -> dict:
    """One of ``op``'s passes (forward or backward) per backend, as its torch.library op dispatches them.
    ``cpp_op`` names the C++ kernel, looked up at call time: the extension registers it when it loads."""
    return {
        "torch": reference,
        "triton": functools.partial(_triton_or_reference, op, triton_launcher, reference),
        "cpp": lambda *args: getattr(torch.ops.so8t_cpp, cpp_op)(*args),
    }


def _triton_or_reference(op: str, launcher, reference, *args):
    """The Triton launcher, or under ``auto`` the reference once any of the op's Triton kernels failed
    to compile or launch (an API its Triton version lacks, a ptxas error, no driver): one warning, and
    the op stays on the reference for the rest of the process, its backward included. An explicit
    ``SO8T_BACKEND=triton`` raises the error. Out of GPU memory is not the kernel's failure: raised."""
    if requested_backend() != "auto":
        return launcher(*args)
    if op not in _triton_failures:
        try:
            return launcher(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - auto never fails: whatever stopped the kernel
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            message = f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]
            _triton_failures[op] = f"its Triton kernel failed with triton {TRITON_VERSION} ({message})"
            _warn_once(op, _triton_failures[op], stacklevel=3)
    return reference(*args)


def _warn_once(op: str, why: str, stacklevel: int) -> None:
    if (op, why) not in _warned:
        _warned.add((op, why))
        warnings.warn(f"so8t: {op} falls back to the PyTorch backend: {why}", RuntimeWarning, stacklevel=stacklevel + 1)


def choose_backend(op: str, device: torch.device) -> str:
    requested = requested_backend()
    if requested != "auto":
        why = why_unusable(requested, device)
        if why is not None:
            raise RuntimeError(f"{ENV_VAR}={requested} cannot run {op} on {device.type}: {why}")
        return requested
    preferred = preferred_backend(device)
    why = why_unusable(preferred, device)
    if why is None and preferred == "triton":
        why = _triton_failures.get(op)
    if why is None:
        return preferred
    _warn_once(op, why, stacklevel=3)
    return "torch"
