"""The checks of a ``so8t train`` run that read the filesystem, before torch is imported: a wrong path or a
busy output directory is reported in a fraction of a second, not after the seconds torch and transformers
take to import. Also fills in what the declarations leave open: the default model and a new output
directory for each run."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace
from pathlib import Path

from ..errors import SO8TError
from ..models.source import check_model
from .options import TrainOptions
from .outputs import check_output_dir

RUNS_DIR = "runs"  # the default --output-dir is RUNS_DIR/<date>-<time>, new for each run


def new_run_dir(now: float | None = None) -> str:
    """``runs/<date>-<time>`` that does not exist yet (``-2``, ``-3`` … after it for runs in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    candidate, number = Path(RUNS_DIR) / stamp, 1
    while candidate.exists():
        number += 1
        candidate = Path(RUNS_DIR) / f"{stamp}-{number}"
    return str(candidate)


def _default_output_dir() -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would pick its own new directory
        raise SO8TError("several processes (torchrun, accelerate) train into one directory: pass --output-dir")
    return new_run_dir()


def preflight(options: TrainOptions) -> TrainOptions:
    """Validates ``options`` and checks every path it names; returns them with ``model`` (the default
    model when none is given) and ``output_dir`` (a new ``runs/<date>-<time>`` when none is given) filled in."""
    options.validate()
    for flag, path in (("--data", options.data), ("--eval-data", options.eval_data)):
        if path is not None and not Path(path).is_file():
            raise SO8TError(f"{flag}: data file {path} not found")
    if options.report_to != "none" and importlib.util.find_spec(options.report_to) is None:
        raise SO8TError(f"--report-to {options.report_to}: the {options.report_to} package is not installed")
    output_dir = options.output_dir or _default_output_dir()
    check_output_dir(Path(output_dir).resolve(), overwrite=options.overwrite, resume=options.resume is not None)
    model = check_model(options.model)
    if options.resume is not None:
        from .checkpoints import find_checkpoint  # imports torch: only when resuming

        find_checkpoint(Path(output_dir).resolve(), options.resume)
    return replace(options, model=model, output_dir=output_dir)
