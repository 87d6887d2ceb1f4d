"""The compiled C++ CPU backend (``csrc/``), if it was built; see csrc/README.md."""

import importlib

_status: dict[str, str | None] = {}


def why_unavailable() -> str | None:
    """None if the extension is loaded and its ops are registered, else why not."""
    if "why" not in _status:
        try:
            importlib.import_module("so8t_kernels._C")
            _status["why"] = None
        except ImportError as error:
            _status["why"] = f"the C++ extension so8t_kernels._C is not built ({error})"
    return _status["why"]
