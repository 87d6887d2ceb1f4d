"""Triton, or a stand-in that lets the kernel modules import where Triton is not installed.

The kernels are defined at import time under ``@triton.jit``; without Triton (macOS, Windows, a
CPU-only install) the stand-in keeps them as plain functions that no backend ever launches, so the
reference and C++ backends still work. ``TRITON_INTERPRET=1`` must be set before this module is
first imported: ``triton.jit`` reads it when a kernel is decorated.
"""

import types

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
    TRITON_VERSION = triton.__version__
except ImportError as error:
    TRITON_IMPORT_ERROR = f"triton is not importable ({error})"
    TRITON_VERSION = None

    def jit(fn=None, **options):
        """``@triton.jit`` and ``@triton.jit(do_not_specialize=...)`` alike: the function itself."""
        return fn if fn is not None else (lambda function: function)

    triton = types.SimpleNamespace(jit=jit, cdiv=lambda a, b: -(-a // b))
    # constexpr: an annotation of kernel parameters, and called on module-level kernel constants.
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["triton", "tl", "TRITON_IMPORT_ERROR", "TRITON_VERSION"]
