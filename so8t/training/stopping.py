"""SIGTERM and SIGINT during ``so8t train``: stop after the current optimizer step, with a checkpoint.

SIGTERM is what a cluster scheduler sends a job it preempts, some time before it kills it; SIGINT is
Ctrl-C. The first of them while the Trainer runs lets the current optimizer step finish, then every
rank stops after that same step: a complete checkpoint of it is saved, the monitor finishes its files,
the lock is released and the run ends with 128 + the signal's number (143, 130). A second signal, or
one that comes while no step runs (loading, publishing), stops at once as Ctrl-C always did: the lock
is released, and a checkpoint cut short stays incomplete (never resumed from, removed later).

A shell without job control starts a background command (``so8t train … &`` in a script) with SIGINT
ignored, so Python never raises KeyboardInterrupt there: so8t listens to SIGINT all the same, unless
``keep_sigint_ignored`` (``--keep-sigint-ignored``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

from .distributed import max_over_ranks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(KeyboardInterrupt):
    """``so8t train`` ended by a signal: ``what`` happened, for the closing line; exit status 128 + its number."""

    def __init__(self, signum: int, what: str):
        super().__init__(what)
        self.what = what
        self.exit_status = 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopOnSignal(TrainerCallback):
    """Turns the first SIGTERM or SIGINT while training into a stop after the current optimizer step,
    with a checkpoint of it. Add it last (after the Trainer's DefaultFlowCallback, whose evaluation
    request it cancels) and train inside ``listening()``."""

    def __init__(self, keep_sigint_ignored: bool = False):
        self.keep_sigint_ignored = keep_sigint_ignored
        self.received: int | None = None  # the first signal this process received while training
        self.stopping: int | None = None  # the signal the run stops for (this rank's, or another rank's)
        self.stopped_after: int | None = None  # the step the run stopped after; its checkpoint is complete
        self._training = False

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signals = [sig for sig in STOP_SIGNALS if not (sig == signal.SIGINT and ignored and self.keep_sigint_ignored)]
        previous = {sig: signal.signal(sig, self._receive) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _receive(self, signum: int, frame) -> None:
        if self.received is not None:
            raise TrainingInterrupted(signum, f"stopped at once by a second {signal_name(signum)}")
        if not (self._training or self.stopped_after is not None):
            raise TrainingInterrupted(signum, f"stopped at once by {signal_name(signum)}")
        # While training, or while a stop another rank asked for ends (torchrun then signals the ranks
        # still running once one has exited): finish as planned.
        self.received = signum

    def interruption(self) -> TrainingInterrupted | None:
        """After ``trainer.train()``: what to raise when a signal stopped it early, else None."""
        if self.stopped_after is None:
            return None
        return TrainingInterrupted(self.stopping, f"stopped by {signal_name(self.stopping)} after step "
                                                  f"{self.stopped_after}")

    def _stop_requested(self, args) -> bool:
        # Every rank asks at the same points (one 4-byte all-reduce), so all stop after the same step.
        self.stopping = max_over_ranks(self.received or 0, args.device) or None
        return self.stopping is not None

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested(args):
            control.should_save = True
            control.should_evaluate = False  # the evaluation of this step would delay the checkpoint
            control.should_training_stop = True
            self.stopped_after = state.global_step

    def on_evaluate(self, args, state, control, **kwargs):
        # A signal during an evaluation: stop right after it (the one before training: after step 1).
        self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if self._stop_requested(args):  # the checkpoint just saved is of this step, complete
            control.should_training_stop = True
            self.stopped_after = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
