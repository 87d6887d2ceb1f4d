"""Temperature scaling for the safety judge: one scalar T, fitted on held-out rows, divides the logits.

A classifier trained to near-zero loss on its training rows answers with probabilities near 1 on
anything, so the judge's confidence threshold (below it: ESCALATE) would never trigger. Dividing the
logits by T > 1 leaves every prediction (the argmax) unchanged and makes the probabilities match how
often the judge is right on rows it never trained on (Guo et al. 2017, "On Calibration of Modern
Neural Networks"). T minimises the held-out negative log-likelihood; the NLL is convex in 1/T, so a
golden-section search over 1/T finds it.

``so8t train --task classify`` writes ``judge_calibration.json`` next to the judge; ``SafetyJudge.load``
reads its ``temperature`` (1.0, the raw softmax, when the file is absent).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SO8TError

CALIBRATION_FILE = "judge_calibration.json"
INVERSE_TEMPERATURE_RANGE = (1e-3, 100.0)  # T from 0.01 to 1000; the search brackets the NLL minimum here
CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Calibration:
    temperature: float
    held_out_rows: int
    held_out_accuracy: float
    nll_before: float  # mean held-out negative log-likelihood at T = 1
    nll_after: float  # ... at the fitted T
    ece_before: float  # expected calibration error (10 confidence bins) at T = 1
    ece_after: float  # ... at the fitted T (measured on the rows T was fitted on: an optimistic figure)


def check_temperature(temperature: float, where: str = "temperature") -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise SO8TError(f"{where} {temperature!r}: must be a finite number > 0")
    return float(temperature)


def _nll(logits, labels, inverse_temperature: float) -> float:
    import torch

    return torch.nn.functional.cross_entropy(logits * inverse_temperature, labels).item()


def expected_calibration_error(probabilities, labels, bins: int = CALIBRATION_BINS) -> float:
    """Σ over confidence bins of (rows in bin / rows) · |accuracy − mean confidence| in the bin."""
    import torch

    confidence, predicted = probabilities.max(dim=-1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    error = 0.0
    for bin_index in range(bins):
        members = index == bin_index
        if members.any():
            error += members.double().mean().item() * abs(correct[members].mean().item() - confidence[members].double().mean().item())
    return error


def fit_temperature(logits, labels) -> Calibration:
    """The NLL-minimising temperature for ``logits`` (rows × classes) with true class ``labels``."""
    import torch

    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(f"expected logits (rows, classes) and one label per row, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    if not torch.isfinite(logits).all():
        raise SO8TError("the judge's held-out logits are not finite: nothing to calibrate")
    low, high = INVERSE_TEMPERATURE_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    # Golden-section search in log(1/T): unimodal there too (a monotone change of variable), and evenly
    # fine over three decades of T. 60 steps shrink the bracket by 0.618**60 ≈ 3e-13.
    low, high = math.log(low), math.log(high)
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    f_left, f_right = _nll(logits, labels, math.exp(left)), _nll(logits, labels, math.exp(right))
    for _ in range(60):
        if f_left <= f_right:
            high, right, f_right = right, left, f_left
            left = high - ratio * (high - low)
            f_left = _nll(logits, labels, math.exp(left))
        else:
            low, left, f_left = left, right, f_right
            right = low + ratio * (high - low)
            f_right = _nll(logits, labels, math.exp(right))
    inverse_temperature = math.exp((low + high) / 2)
    accuracy = (logits.argmax(dim=-1) == labels).double().mean().item()
    return Calibration(
        temperature=1.0 / inverse_temperature, held_out_rows=len(labels), held_out_accuracy=accuracy,
        nll_before=_nll(logits, labels, 1.0), nll_after=_nll(logits, labels, inverse_temperature),
        ece_before=expected_calibration_error(torch.softmax(logits, dim=-1), labels),
        ece_after=expected_calibration_error(torch.softmax(logits * inverse_temperature, dim=-1), labels),
    )


def write_calibration(calibration: Calibration, directory: str | Path) -> Path:
    path = Path(directory) / CALIBRATION_FILE
    path.write_text(json.dumps(asdict(calibration), indent=2) + "\n")
    return path


def read_temperature(directory: str | Path) -> float:
    """The judge's temperature from ``DIR/judge_calibration.json``; 1.0 (the raw softmax) without one."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    try:
        value = json.loads(path.read_text())["temperature"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise SO8TError(f"{path}: unreadable calibration ({type(error).__name__}: {error})") from None
    return check_temperature(value, f"{path}: temperature")
