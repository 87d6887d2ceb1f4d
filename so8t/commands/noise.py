"""Keeps known third-party messages that ask nothing of the user out of so8t's terminal output.

Each filter drops exactly one message; every other record and warning passes.

- bitsandbytes ≥ 0.49 on a CPU with avx512_bf16 tries, at import, to fetch an optional 4-bit GEMM kernel
  through the ``kernels`` package and, when that package is absent, logs a warning telling the user to
  install it. Its built-in CPU kernel is used instead and gives the same results; the line opened every
  so8t command on such CPUs.
- peft (0.21) reads transformers 5's deprecated ``is_gradient_checkpointing`` whenever it wraps a model,
  so every ``so8t train`` printed transformers' FutureWarning about an API so8t does not call.
"""

from __future__ import annotations

import logging
import warnings

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
PEFT_DEPRECATION_MESSAGE = "`is_gradient_checkpointing` is deprecated"


class _DropOptionalKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OPTIONAL_KERNEL_MESSAGE)


_FILTER = _DropOptionalKernelWarning()


def quiet_third_party_noise() -> None:
    """Install the filters; call before bitsandbytes is imported. Safe to call more than once."""
    # getLogger creates the logger bitsandbytes will look up later, so this needs no bitsandbytes import.
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION_MESSAGE, category=FutureWarning)
