"""The Hugging Face engine: a transformers model (LoRA merged, gates attached) on one model thread.

The thread runs the safety judge's calls one at a time and generation in dynamic batches: the requests
waiting when it becomes free are decoded together (up to ``max_batch``, hf_batch.py), so under load the
prompts that arrive while a batch runs share the next one. The model, the tokenizer and torch's RNG
are not thread-safe, and a second thread would only fight the first for torch's threads; the event loop
stays free for everything else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

import torch

from ...models.inference import load_for_inference
from ...models.source import DEMO_MODEL
from .base import Completion, Engine, EngineRequest, TextDelta
from .hf_batch import BatchDecoder, Row

DEFAULT_MAX_BATCH = 16

log = logging.getLogger("so8t.serve")


class HFEngine(Engine):
    def __init__(self, model, tokenizer, handle, name: str, max_batch: int = DEFAULT_MAX_BATCH):
        self.model = model
        self.tokenizer = tokenizer
        self.handle = handle  # so8t.gates.placement.SO8THandle, or None for a model without gates
        self.name = name
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.gated_layers = list(handle.layer_indices) if handle is not None else []
        self.sigma_alpha = self._sigma_alpha()
        self.decoder = BatchDecoder(model, tokenizer, self.sigma_alpha)
        self.max_batch = max_batch
        self._rows: dict[str, Row] = {}  # submitted, not completed
        self._items: deque = deque()  # Row, or (Future, callable) for run_exclusive
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="so8t-model", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model: str = DEMO_MODEL, adapter: str | None = None, name: str | None = None,
             max_batch: int = DEFAULT_MAX_BATCH) -> HFEngine:
        """The engine of ``model`` (concrete: ``demo``, a path or a hub id) and ``adapter`` (see
        so8t.models.inference), served as ``name`` (default: the short name of the model and adapter)."""
        loaded = load_for_inference(model, adapter)
        return cls(loaded.model, loaded.tokenizer, loaded.handle, name or loaded.name, max_batch)

    def _sigma_alpha(self) -> dict[int, float]:
        """σ(α) per gated layer: the gates are frozen while serving, so once."""
        if self.handle is None:
            return {}
        return dict(zip(self.handle.layer_indices, torch.sigmoid(self.handle.alpha.detach().float()).tolist()))

    def stream(self, request: EngineRequest) -> AsyncIterator[TextDelta | Completion]:
        return self._events(request, deltas=True)

    async def generate(self, request: EngineRequest) -> Completion:
        events = self._events(request, deltas=False)  # no text decoded per step: only the Completion
        try:
            return await anext(events)
        finally:
            await events.aclose()

    async def _events(self, request: EngineRequest, deltas: bool) -> AsyncIterator[TextDelta | Completion]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:  # on the model thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop closed: nobody is reading any more
                pass

        row = Row(request, emit, deltas)
        self._submit(row)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            row.cancelled.set()  # no effect once it has completed

    def cancel(self, request_id: str) -> None:
        row = self._rows.get(request_id)
        if row is not None:
            row.cancelled.set()

    async def run_exclusive(self, function: Callable, *args):
        """On the model thread, between batches."""
        future: Future = Future()
        self._submit((future, lambda: function(*args)))
        return await asyncio.wrap_future(future)

    def _submit(self, item) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError("the model thread has stopped")
            if isinstance(item, Row):
                self._rows[item.request.request_id] = item
            self._items.append(item)
            self._condition.notify()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._items and not self._closed:
                    self._condition.wait()
                if not self._items:
                    return
                item = self._items.popleft()
                batch = [item] + self._waiting_rows(self.max_batch - 1) if isinstance(item, Row) else None
            if batch is None:
                self._run_call(*item)
            else:
                self._run_batch(batch)

    def _waiting_rows(self, limit: int) -> list[Row]:
        taken, others = [], deque()
        while self._items and len(taken) < limit:
            item = self._items.popleft()
            (taken if isinstance(item, Row) else others).append(item)
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

    def _run_batch(self, rows: list[Row]) -> None:
        try:
            self.decoder.run(rows)
        except BaseException as error:
            for row in rows:
                if row.finish_reason is None:
                    row.emit(error)
        finally:
            with self._condition:
                for row in rows:
                    self._rows.pop(row.request.request_id, None)

    def shutdown(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()
