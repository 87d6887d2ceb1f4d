"""``so8t export RUN --output-dir DIR``: a finished run (or one of its checkpoints) as a standalone Hugging
Face model folder: the base with the LoRA merged, the gates, the tokenizer and chat template. After
``import so8t``, ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it with its gates; with so8t installed
beside vLLM, vLLM's own server does (so8t.vllm). A ``--task classify`` run exports as a sequence
classifier (``AutoModelForSequenceClassification``).

Bad input (not a finished run, a checkpoint cut short, an output directory that is not empty, a base model
that cannot be found) is one line on stderr, exit 2, and nothing written.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SO8TError
from .library_bars import quiet_library_bars_off_terminal

DTYPES = ("float32", "bfloat16", "float16")  # so8t.models.export.DTYPES (importing it costs torch here)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a so8t train output directory (finished), or one of its checkpoint-N directories")
    parser.add_argument("--output-dir", required=True, help="the model folder to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="of the base weights; the gates stay float32 (default: %(default)s)")
    parser.add_argument("--model", help="the base model, where the run's recorded base moved to (default: the hub id or "
                                        "directory the run was trained from)")


def run(args: argparse.Namespace) -> int:
    from ..models.export import CLASSIFY, check_output_dir, export_model, export_run, inspect_run

    quiet_library_bars_off_terminal()
    try:
        source = inspect_run(args.run, args.model)
        target = check_output_dir(args.output_dir)
        if source.task == CLASSIFY:
            target = _export_judge(source, target, args.dtype, args.model, export_model)
        else:
            target = export_run(source.path, target, args.dtype, args.model,
                                progress=lambda message: print(message, file=sys.stderr))
    except SO8TError as error:
        print(f"so8t export: error: {error}", file=sys.stderr)
        return 2
    gates = "with its SO8T gates" if source.gated else "without gates (trained with --no-so8t)"
    head = "SequenceClassification" if source.task == CLASSIFY else "CausalLM"
    serving = "" if source.task == CLASSIFY else f"; serve it with: so8t serve --engine vllm --model {target}"
    print(f"so8t export: {target} {gates}; load it with import so8t and "
          f"AutoModelFor{head}.from_pretrained{serving}")
    return 0


def _export_judge(source, target, dtype: str, model: str | None, export_model):
    from ..gates.placement import find_so8t_handle
    from ..judge.judge import load_classifier
    from ..models.source import resolve_model_source

    if source.checkpoint:
        raise SO8TError(f"{source.path}: export the finished judge, not a checkpoint of it (a judge's tokenizer and "
                        "calibration are written when its run finishes)")
    # --model: where a LoRA judge's base is now (a .gguf file: its converted folder)
    judge, tokenizer = load_classifier(source.path, resolve_model_source(model) if model is not None else None)
    return export_model(judge, tokenizer, find_so8t_handle(judge), target, dtype, source,
                        progress=lambda message: print(message, file=sys.stderr))
