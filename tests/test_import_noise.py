"""so8t keeps bitsandbytes' import-time "install `kernels`" warning out of the user's terminal.

The warning appears only on CPUs with avx512_bf16 and without the optional ``kernels`` package, so the
end-to-end check has a control run that shows the line is really printed there without the filter.
"""

import importlib.util
import logging
import subprocess
import sys

import pytest

from so8t.import_noise import BITSANDBYTES_CPU_LOGGER, OPTIONAL_KERNEL_MESSAGE, silence_import_noise


def test_the_filter_drops_only_the_optional_kernel_message(caplog):
    silence_import_noise()
    silence_import_noise()  # idempotent: one filter, not two
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
        logger.warning(OPTIONAL_KERNEL_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "x")
        logger.warning("a different bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["a different bitsandbytes warning"]


def _stderr_of(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr


def _cpu_has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return "avx512_bf16" in cpuinfo.read()


@pytest.mark.skipif(sys.platform != "linux", reason="reads the CPU flags from /proc/cpuinfo (Linux only)")
def test_so8t_commands_print_no_kernel_warning():
    if not _cpu_has_avx512_bf16():
        pytest.skip("this CPU lacks avx512_bf16: bitsandbytes does not try the optional kernel, nothing to filter")
    if importlib.util.find_spec("kernels") is not None:
        pytest.skip("the optional `kernels` package is installed: bitsandbytes has nothing to warn about")
    assert OPTIONAL_KERNEL_MESSAGE in _stderr_of("-c", "import bitsandbytes")  # control: the line is real here
    assert OPTIONAL_KERNEL_MESSAGE not in _stderr_of("-m", "so8t", "info")  # `so8t info` imports bitsandbytes
