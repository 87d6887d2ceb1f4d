"""The compiled C++ CPU backend (``csrc/``), if it was built; see csrc/README.md.

Importing ``so8t_kernels._C`` registers its kernels as ``torch.ops.so8t_cpp.*``. The extension is
built by ``pip install --no-build-isolation -e .`` against the torch installed then; an extension
built against another torch release is refused rather than risked (a C++ ABI mismatch can crash).
"""

import importlib

import torch

EXTENSION = "so8t_kernels._C"
BUILD_COMMAND = "`pip install --no-build-isolation -e .` (csrc/README.md)"
# Every op csrc/register.cpp defines: an extension built before one was added is refused as a whole.
OPS = ("exp_forward", "exp_backward", "rotate_forward", "rotate_backward", "logit_stats", "linear_cross_entropy")
_status: dict[str, str | None] = {}


def _release(version: str) -> str:
    """'2.13.0+cpu' → '2.13.0': CPU and CUDA builds of one release share the C++ ABI the kernels use."""
    return version.split("+")[0]


def _load() -> str | None:
    try:
        module = importlib.import_module(EXTENSION)
    except ModuleNotFoundError as error:
        if error.name != EXTENSION:
            return f"the C++ extension {EXTENSION} failed to import ({error})"
        return f"the C++ extension {EXTENSION} is not built: build it with {BUILD_COMMAND}"
    except ImportError as error:
        # An undefined C++ symbol is the usual sign of an extension built against another torch.
        return f"the C++ extension {EXTENSION} failed to import ({error}): rebuild it with {BUILD_COMMAND}"
    built_with, running = module.TORCH_VERSION, _release(torch.__version__)
    if built_with != running:
        return (
            f"the C++ extension was built against torch {built_with}, this is torch {running}: "
            f"rebuild it with {BUILD_COMMAND}"
        )
    missing = [op for op in OPS if not hasattr(torch.ops.so8t_cpp, op)]
    if missing:
        return f"the C++ extension lacks {', '.join(missing)} (built from older sources): rebuild it with {BUILD_COMMAND}"
    return None


def why_unavailable() -> str | None:
    """None if the extension is loaded and its ops are registered, else why not."""
    if "why" not in _status:
        _status["why"] = _load()
    return _status["why"]


def describe() -> str:
    """One line for ``python -m so8t_kernels.info``: active (and which CPU kernel variant), or why not."""
    why = why_unavailable()
    if why is not None:
        return f"inactive: {why}"
    module = importlib.import_module(EXTENSION)
    return f"active: built against torch {module.TORCH_VERSION}, {module.KERNEL_VARIANT} kernels"
