"""Training and eval losses as the Trainer logs them (``loss`` every ``logging_steps``, ``eval_loss`` at
each evaluation), kept beside the samples: their own steps, every value of the run (one number per log,
so memory stays small)."""

import math

import numpy as np

LOSS_KEYS = ("loss", "eval_loss")
LOSS_LABELS = {"loss": "training loss", "eval_loss": "eval loss"}


class Losses:
    def __init__(self):
        self.points: dict[str, list[tuple[int, float]]] = {key: [] for key in LOSS_KEYS}

    def add(self, step: int, logs: dict) -> dict:
        """Keeps the finite losses among ``logs``; returns them (``{}`` when there is none)."""
        found = {}
        for key in LOSS_KEYS:
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                found[key] = float(value)
                self.points[key].append((int(step), float(value)))
        return found

    def arrays(self) -> dict[str, np.ndarray]:
        """``[n, 2]`` (step, value) per key that has values: a copy, safe to hand to another thread."""
        return {key: np.asarray(points, dtype=np.float64).reshape(-1, 2)
                for key, points in self.points.items() if points}

    def summary(self) -> dict:
        """Per key with values: the final one (and its step) and the minimum."""
        return {
            key: {"step": points[-1][0], "final": points[-1][1], "min": min(value for _, value in points)}
            for key, points in self.points.items() if points
        }
