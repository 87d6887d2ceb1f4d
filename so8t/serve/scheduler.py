"""The one model thread: judge calls one at a time, generation requests in dynamic batches, and the
bounded admission that answers 503 when the server is full.

Generation requests that are waiting when the thread becomes free go into one batch (up to
``max_batch``): under load, prompts that arrive while a batch runs are decoded together in the next.
The model, tokenizer and RNG are not thread-safe, and a second thread would only fight the first
for torch's threads; the event loop stays free for /health, /metrics and new connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from .generation import Generation, GenerationRequest, TextGenerator

log = logging.getLogger("so8t.serve")


class ServerBusy(Exception):
    """More than max_queue requests are already in the server."""


class Admission:
    """A request's place in the server; ``release`` (once, idempotent) gives it back. A streamed response
    keeps it until its stream ends, after its handler has returned."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._leave()


class Scheduler:
    def __init__(self, generator: TextGenerator, max_batch: int, max_queue: int,
                 on_depth_change: Callable[[int], None] = lambda depth: None):
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._on_depth_change = on_depth_change
        self._depth = 0  # admitted requests not finished yet
        self._items: deque = deque()  # (Future, callable) or (Future, GenerationRequest)
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="so8t-model", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests in the server: waiting for the model thread or running on it."""
        return self._depth

    def admit(self) -> Admission:
        """Counts a request in until its Admission is released; raises ServerBusy when max_queue are in already."""
        with self._condition:
            if self._depth >= self.max_queue:
                raise ServerBusy
            self._depth += 1
            depth = self._depth
        self._on_depth_change(depth)
        return Admission(self)

    def _leave(self) -> None:
        with self._condition:
            self._depth -= 1
            depth = self._depth
        self._on_depth_change(depth)

    async def call(self, function: Callable, *args):
        """``function(*args)`` on the model thread, alone."""
        return await self._submit(lambda: function(*args))

    async def generate(self, request: GenerationRequest) -> Generation:
        """Decoded in a batch with whatever else is waiting; cancelling the awaiting task cancels the row."""
        try:
            return await self._submit(request)
        except asyncio.CancelledError:
            request.cancelled.set()
            raise

    async def _submit(self, item) -> object:
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the model thread has stopped")
            self._items.append((future, item))
            self._condition.notify()
        return await asyncio.wrap_future(future)

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._items and not self._closed:
                    self._condition.wait()
                if not self._items:
                    return
                future, item = self._items.popleft()
                batch = [(future, item)]
                if isinstance(item, GenerationRequest):
                    batch += self._take_waiting_requests(self.max_batch - 1)
            if isinstance(item, GenerationRequest):
                self._run_batch(batch)
            else:
                self._run_call(future, item)

    def _take_waiting_requests(self, limit: int) -> list:
        taken, others = [], deque()
        while self._items and len(taken) < limit:
            entry = self._items.popleft()
            (taken if isinstance(entry[1], GenerationRequest) else others).append(entry)
        self._items.extendleft(reversed(others))  # judge calls keep their place
        return taken

    @staticmethod
    def _run_call(future: Future, function: Callable) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function())
        except BaseException as error:  # handed to the awaiting request
            future.set_exception(error)

    def _run_batch(self, batch: list) -> None:
        batch = [(future, request) for future, request in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            results = self.generator.generate_batch([request for _, request in batch])
        except BaseException as error:
            for future, _ in batch:
                future.set_exception(error)
            return
        for (future, _), result in zip(batch, results):
            future.set_result(result)

    def shutdown(self) -> None:
        """Finishes what is queued, then stops the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()
