"""The last ``capacity`` samples, in preallocated arrays: memory stays fixed however long training runs."""

import numpy as np

from .schema import RunInfo
from .series import Series


class RingBuffer:
    def __init__(self, info: RunInfo, capacity: int):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._slots = Series.empty_arrays(info, capacity)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, sample: dict) -> None:
        self._slots.set_row(self._next, sample)
        self._next = (self._next + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def latest(self) -> dict | None:
        return self._slots.row((self._next - 1) % self.capacity) if self._count else None

    def series(self) -> Series:
        """A copy, oldest first, safe to hand to another thread."""
        order = np.arange(self._next - self._count, self._next) % self.capacity
        slots = self._slots
        return Series(
            slots.info, slots.steps[order], slots.epochs[order], slots.times[order],
            {name: values[order] for name, values in slots.values.items()},
        )
