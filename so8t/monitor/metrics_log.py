"""metrics.jsonl: its lines, appending them so that a crash costs little, and reading them back.

One JSON object per line, with a ``type``: ``meta`` (once per run or resume: layers, LoRA groups,
annealing landmarks), ``sample`` (one per sampled step), ``alert``, and ``loss`` (the training and eval
losses the Trainer logged at a step). Non-finite numbers are written as null so that strict JSON readers
(jq, JavaScript) accept the file; they read back as NaN.

Every line goes to the OS as soon as it is written (one small write): a killed process (``kill -9``)
loses at most the line being written, which the reader then skips. ``sync()`` (fsync) runs when the
recorder flushes: a machine crash loses at most one flush interval. A torn line can only be the last
one; a bad line anywhere else means the file is not ours or was damaged, and reading stops with a
message naming the line.
"""

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .losses import Losses
from .schema import EPOCH, METRICS, SCALAR, STEP, TIME, RunInfo

META, SAMPLE, ALERT, LOSS = "meta", "sample", "alert", "loss"


class MetricsFileError(ValueError):
    """metrics.jsonl is missing, empty or not readable as monitor output."""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def encode_sample(sample: dict) -> str:
    record = {"type": SAMPLE, STEP: int(sample[STEP]), EPOCH: sample[EPOCH], TIME: sample[TIME]}
    for metric in METRICS:
        value = sample[metric.name]
        if metric.axis == SCALAR:
            record[metric.name] = _finite_or_none(float(value))
        else:
            record[metric.name] = [_finite_or_none(float(v)) for v in value]
    return json.dumps(record, separators=(",", ":"))


def encode_meta(info: RunInfo, step: int, time: float) -> str:
    return json.dumps({"type": META, STEP: step, TIME: time, **info.to_json()}, separators=(",", ":"))


def encode_losses(step: int, losses: dict) -> str:
    return json.dumps({"type": LOSS, STEP: int(step), **losses}, separators=(",", ":"))


def encode_alert(alert: dict) -> str:
    return json.dumps({"type": ALERT, **alert}, separators=(",", ":"))


def decode_sample(record: dict) -> dict:
    sample = {STEP: int(record[STEP]), EPOCH: _nan_if_none(record.get(EPOCH)), TIME: _nan_if_none(record.get(TIME))}
    for metric in METRICS:
        if metric.axis == SCALAR:  # absent from files written before the metric existed: NaN
            sample[metric.name] = _nan_if_none(record.get(metric.name))
        else:
            sample[metric.name] = np.array([_nan_if_none(v) for v in record[metric.name]], dtype=np.float64)
    return sample


def decode_alert(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "type"}


def _nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


def iter_records(path: Path) -> Iterator[tuple[str, str, dict]]:
    """(type, raw line, decoded object) per line; skips a torn last line, raises on any other bad line."""
    with open(path, encoding="utf-8") as file:
        pending_error = None
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            if pending_error is not None:
                raise MetricsFileError(pending_error)
            try:
                record = json.loads(line)
                kind = record["type"]
            except (ValueError, KeyError, TypeError):
                pending_error = f"{path}:{number}: not a monitor record: {line[:80]!r}"
                continue
            yield kind, line if line.endswith("\n") else line + "\n", record


@dataclass
class MetricsRun:
    info: RunInfo  # the latest meta record's
    samples: list[dict]
    alerts: list[dict]
    losses: Losses


def read_run(path: Path) -> MetricsRun:
    """Everything a metrics.jsonl holds, in file order."""
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"{path} does not exist")
    info, samples, alerts, losses = None, [], [], Losses()
    try:
        for kind, _, record in iter_records(path):
            if kind == META:
                info = RunInfo.from_json(record)
            elif kind == SAMPLE:
                samples.append(decode_sample(record))
            elif kind == ALERT:
                alerts.append(decode_alert(record))
            elif kind == LOSS:
                losses.add(record[STEP], record)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, MetricsFileError):
            raise
        raise MetricsFileError(f"{path}: a record lacks a field or has a wrong type ({error!r})") from error
    if info is None:
        raise MetricsFileError(f"{path} has no meta record: not written by the so8t monitor")
    return MetricsRun(info, samples, alerts, losses)


class MetricsLog:
    """Appends to metrics.jsonl (see the module's docstring for what a crash costs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._unsynced = 0

    def start_fresh(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")

    def resume(self, last_step: int, on_record: Callable[[str, dict], None]) -> None:
        """Keep the records up to ``last_step`` (handing each to ``on_record``), drop the later ones and
        a torn last line, then append. The rewrite goes through a temporary file and a rename, so a crash
        during it leaves the old file whole."""
        if not self.path.is_file():
            self.start_fresh()
            return
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as kept:
            for kind, line, record in iter_records(self.path):
                if record.get("step", 0) <= last_step:
                    kept.write(line)
                    on_record(kind, record)
            kept.flush()
            os.fsync(kept.fileno())
        os.replace(partial, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        self._unsynced += 1

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
