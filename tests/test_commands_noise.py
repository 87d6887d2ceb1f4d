"""so8t keeps known third-party messages that ask nothing of the user out of its terminal output:
bitsandbytes' import-time "install `kernels`" warning and transformers' deprecation warning that peft
triggers. Each end-to-end check has a control run showing the message is really printed without so8t's
filter; where this machine or these versions do not print it, the check skips and says why."""

import importlib.util
import logging
import os
import subprocess
import sys
import warnings

import pytest

from so8t.commands.noise import (
    BITSANDBYTES_CPU_LOGGER,
    OPTIONAL_KERNEL_MESSAGE,
    PEFT_DEPRECATION_MESSAGE,
    quiet_third_party_noise,
)

OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def test_the_filters_drop_only_their_messages(caplog):
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    filters_before, warning_filters_before = list(logger.filters), list(warnings.filters)
    try:
        # catch_warnings restores the process's warning filters: the rest of the session sees its own.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_third_party_noise()
            quiet_third_party_noise()  # idempotent: one filter, not two
            assert len(logger.filters) == 1
            with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
                logger.warning(OPTIONAL_KERNEL_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "x")
                logger.warning("a different bitsandbytes warning")
            warnings.warn(PEFT_DEPRECATION_MESSAGE + " and will be removed in v6.", FutureWarning)
            warnings.warn("another deprecation", FutureWarning)
    finally:
        logger.filters[:] = filters_before
    assert warnings.filters == warning_filters_before  # nothing leaks into the rest of the session
    assert [record.getMessage() for record in caplog.records] == ["a different bitsandbytes warning"]
    assert [str(warning.message) for warning in caught] == ["another deprecation"]


def _stderr_of(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=OFFLINE)
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


ADD_LORA = ("from so8t.training.options import TrainOptions; from so8t.models.loading import load_model_and_tokenizer; "
            "from so8t.training.lora import add_lora; options = TrainOptions(model='demo'); "
            "add_lora(options, load_model_and_tokenizer(**options.base_model_arguments())[0])")


def test_wrapping_a_model_in_lora_prints_no_deprecation_warning():
    control = _stderr_of("-c", ADD_LORA)
    if PEFT_DEPRECATION_MESSAGE not in control:
        pytest.skip("the installed peft and transformers no longer warn about is_gradient_checkpointing")
    quiet = "from so8t.commands.noise import quiet_third_party_noise; quiet_third_party_noise(); "
    assert PEFT_DEPRECATION_MESSAGE not in _stderr_of("-c", quiet + ADD_LORA)
