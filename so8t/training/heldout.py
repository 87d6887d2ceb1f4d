"""The held-out set of a run: ``--eval-data``, or ``--eval-fraction`` of ``--data`` split off by ``--seed``."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..errors import SO8TError
from .options import TrainOptions


def split_held_out(rows: Sequence, options: TrainOptions, read: Callable[[str], list]) -> tuple[list, list | None]:
    """(training rows, held-out rows or None). The same rows, seed and fraction give the same split."""
    if options.eval_data is not None:
        return list(rows), read(options.eval_data)
    if not options.eval_fraction:
        return list(rows), None
    count = max(1, round(len(rows) * options.eval_fraction))
    if count >= len(rows):
        raise SO8TError(f"--eval-fraction {options.eval_fraction} leaves no training rows of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(options.seed).shuffle(order)
    held = set(order[:count])
    return [row for index, row in enumerate(rows) if index not in held], [rows[index] for index in sorted(held)]
