"""``so8t info``: package versions, devices, and which kernel backend each op runs on."""

from __future__ import annotations

import argparse
import warnings


def _version(module_name: str) -> str:
    try:
        return __import__(module_name).__version__
    except ImportError:
        return "not installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from so8t_kernels import info

    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        print(f"{name:<13} {_version(name)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report itself says which backends fall back, and why
        print(info.report())
    return 0
