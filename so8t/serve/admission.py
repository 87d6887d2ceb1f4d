"""Bounded admission: at most ``max_queue`` requests in the server (waiting for the engine or generating);
beyond, 503 with Retry-After. A streamed response keeps its place until its stream ends."""

from __future__ import annotations

import threading
from collections.abc import Callable


class ServerBusy(Exception):
    """More than max_queue requests are already in the server."""


class Admission:
    """A request's place in the server; ``release`` (idempotent) gives it back."""

    def __init__(self, gate: AdmissionGate):
        self._gate = gate
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.leave()


class AdmissionGate:
    def __init__(self, max_queue: int, on_depth_change: Callable[[int], None] = lambda depth: None):
        self.max_queue = max_queue
        self._on_depth_change = on_depth_change
        self._depth = 0
        self._lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Requests in the server: waiting for the engine or generating."""
        return self._depth

    def admit(self) -> Admission:
        """Counts a request in until its Admission is released; raises ServerBusy when max_queue are in already."""
        with self._lock:
            if self._depth >= self.max_queue:
                raise ServerBusy
            self._depth += 1
            depth = self._depth
        self._on_depth_change(depth)
        return Admission(self)

    def leave(self) -> None:
        with self._lock:
            self._depth -= 1
            depth = self._depth
        self._on_depth_change(depth)
