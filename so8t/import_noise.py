"""Keep third-party import-time log lines that ask nothing of the user out of so8t's terminal output.

bitsandbytes ≥ 0.49 on a CPU with avx512_bf16 tries, at import, to fetch an optional 4-bit GEMM kernel
through the ``kernels`` package and, when that package is absent, logs a warning telling the user to
install it. Its built-in CPU kernel is used instead and gives the same results, so the line is noise
that opens every so8t command on such CPUs. The filter drops exactly that message; every other record
of that logger passes.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropOptionalKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OPTIONAL_KERNEL_MESSAGE)


_FILTER = _DropOptionalKernelWarning()


def silence_import_noise() -> None:
    """Install the filter; call before bitsandbytes is imported. Safe to call more than once."""
    # getLogger creates the logger bitsandbytes will look up later, so this needs no bitsandbytes import.
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
