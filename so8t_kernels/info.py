"""``python -m so8t_kernels.info``: versions, devices, usable backends and the backend each op would use."""

import platform
import sys

import torch

from . import _backend, _cpp
from ._triton import TRITON_IMPORT_ERROR

def _version(module_name: str) -> str:
    try:
        return __import__(module_name).__version__
    except ImportError:
        return "not installed"


def report() -> str:
    lines = [
        f"python        {sys.version.split()[0]} ({platform.machine()})",
        f"torch         {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton        {_version('triton')}" + (f"  [{TRITON_IMPORT_ERROR}]" if TRITON_IMPORT_ERROR else ""),
        f"csrc          {_cpp.describe()}",
        f"SO8T_BACKEND  {_backend.requested_backend()}",
        f"interpreter   TRITON_INTERPRET={'1' if _backend.triton_interpreted() else '0'}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        lines.append(f"cuda          {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        lines.append("cuda          not available")
    for device in devices:
        lines.append(f"\n{device.type} tensors")
        for backend in _backend.BACKENDS:
            why = _backend.why_unusable(backend, device)
            lines.append(f"  {backend:<7} {'usable' if why is None else 'unusable: ' + why}")
        for op in _backend.OPS:
            try:
                chosen = _backend.choose_backend(op, device)
            except RuntimeError as error:
                chosen = f"error: {error}"
            lines.append(f"  {op:<20} → {chosen}")
    return "\n".join(lines)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    print(report())
