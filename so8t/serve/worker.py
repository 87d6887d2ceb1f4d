"""Runs model calls off the event loop, one at a time, in arrival order.

One thread owns the model: generation holds torch's threads anyway, so running two requests at once
would only make both slower, and the model, tokenizer and RNG are not thread-safe. Waiting requests
queue in the executor; the event loop stays free for /health, /metrics and new connections.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelWorker:
    def __init__(self, on_depth_change: Callable[[int], None] = lambda depth: None):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="so8t-model")
        self._depth = 0
        self._lock = threading.Lock()
        self._on_depth_change = on_depth_change

    @property
    def depth(self) -> int:
        """Requests waiting for or running on the model thread."""
        return self._depth

    async def run(self, function: Callable[..., T], *args, **kwargs) -> T:
        self._change_depth(+1)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))
        finally:
            self._change_depth(-1)

    def _change_depth(self, delta: int) -> None:
        with self._lock:
            self._depth += delta
            depth = self._depth
        self._on_depth_change(depth)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
