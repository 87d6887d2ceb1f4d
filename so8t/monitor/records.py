"""The lines of metrics.jsonl and how to read them back.

One JSON object per line, with a ``type``: ``meta`` (once per run or resume: layers, LoRA groups,
annealing landmarks), ``sample`` (one per sampled step), ``alert``, and ``loss`` (the training and eval
losses the Trainer logged at a step). Non-finite numbers are written
as null so that strict JSON readers (jq, JavaScript) accept the file; they read back as NaN.
A line torn by ``kill -9`` can only be the last one: the reader skips it. A bad line anywhere else
means the file is not ours or was damaged, and reading stops with a message naming the line.
"""

import json
import math
from collections.abc import Iterator
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


def read_metrics(path: Path) -> tuple[RunInfo, list[dict], list[dict]]:
    """The latest run info, every sample (in file order) and every alert of a metrics.jsonl."""
    run = read_run(path)
    return run.info, run.samples, run.alerts
