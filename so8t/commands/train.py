"""``so8t train`` (also ``python -m so8t.commands.train``): QLoRA fine-tuning with SO(8) gates on the intermediate
decoder layers, with the HF Trainer and peft LoRA.

With no arguments it trains the embedded default (a small Phi-3-architecture model from a config, a
byte-level tokenizer, the bundled thinking dataset) on CPU in well under a minute, downloading nothing.
``--task classify`` trains the safety judge instead. This module is the command: it parses the
arguments and picks the task; ``so8t.training.finetune`` and ``so8t.training.classify`` are the tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..errors import SO8TError
from ..training.options import TrainOptions, add_arguments, options_from_args

__all__ = ["TrainOptions", "add_arguments", "main", "options_from_args", "run"]


@contextlib.contextmanager
def _threads_for(args: argparse.Namespace):
    """One intra-op thread for the embedded demo on CPU, unless OMP_NUM_THREADS says otherwise.

    Its tensors (8 × ~90 tokens × 128) are too small to split, and two threads wait on each other
    whenever another process holds a core: the 150 demo steps took 526 s on two threads and 47 s on
    one, on the same loaded 2-core machine.
    """
    import torch

    previous = torch.get_num_threads()
    if args.model is None and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_task(options: TrainOptions, task: str) -> None:
    if task == "classify":
        from ..training.classify import train_classifier

        train_classifier(options)
    else:
        from ..training.finetune import finetune

        finetune(options)


def run(args: argparse.Namespace) -> int:
    try:
        with _threads_for(args):
            _run_task(options_from_args(args), args.task)
    except SO8TError as error:
        print(f"so8t train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGTERM/SIGINT as so8t.training.stopping handles them
        from ..training.summary import interrupted_summary

        print("\n" + interrupted_summary(Path(args.output_dir).resolve(), args.save_steps, interruption),
              file=sys.stderr)
        return getattr(interruption, "exit_status", 130)
    return 0
