"""Running a built Trainer the way ``so8t train`` does, for either task: hold the output directory,
resume, train, refuse weights that are not finite, publish the final files."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from ..errors import SO8TError
from ..gates.placement import SO8THandle
from ..monitor.callback import SO8TMonitorCallback
from .checkpoints import checkpoints, find_checkpoint, is_complete, nonfinite_parameters, restore_so8t_state
from .distributed import max_over_ranks, whole_gates, whole_trainable_state
from .options import TrainOptions
from .outputs import WRITE_ERRNOS, claimed_output_dir, describe_os_error, nearly_full, publish
from .stopping import StopOnSignal
from .trainer import monitoring_dir


def kept_checkpoints(output_dir: Path, which: str = "checkpoints") -> str:
    complete = [path.name for path in checkpoints(output_dir) if is_complete(path)]
    if not complete:
        return ""
    return f"; {which} kept in {output_dir}: {', '.join(complete)} (continue with --resume)"


def _write_failure(error: BaseException, output_dir: Path) -> str | None:
    """What went wrong, when ``error`` is a failed write; None when it is something else."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return describe_os_error(error)
    if isinstance(error, Exception) and nearly_full(output_dir):
        return f"no space left on the device of {output_dir} ({type(error).__name__}: {error})"
    return None


def _close_monitor(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, SO8TMonitorCallback):
            with contextlib.suppress(OSError):
                callback.close()


def _end_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def run_training(trainer, options: TrainOptions, handle: SO8THandle | None,
                 write_final: Callable[[Path, dict | None], None],
                 before_publish: Callable[[], None] | None = None) -> Path:
    """Trains ``trainer`` into ``options.output_dir`` and publishes ``write_final(directory, trainable)``'s
    files there (rank 0; ``trainable``: under FSDP the whole trainable tensors to save, else None).
    ``before_publish`` runs on every rank after training, before that: a forward pass of a model sharded by
    FSDP gathers its parameters from every rank, so one on rank 0 alone would wait for the others or fail.
    Every rank returns (or raises) once rank 0 has published.
    Failures a user can act on are SO8TErrors: a full or read-only disk, weights that are not finite;
    SIGTERM and SIGINT end it with TrainingInterrupted (a KeyboardInterrupt), after a checkpoint when they
    came while it trained. Returns the output directory."""
    output_dir = Path(options.output_dir).resolve()
    is_main = trainer.is_world_process_zero()
    resume = options.resume is not None
    held = claimed_output_dir(output_dir, options.overwrite, resume) if is_main else contextlib.nullcontext()
    stop = StopOnSignal(options.keep_sigint_ignored)
    trainer.add_callback(stop)
    with stop.listening(), held:
        checkpoint = find_checkpoint(output_dir, options.resume) if resume else None
        if checkpoint is not None:
            restore_so8t_state(checkpoint, handle, monitoring_dir(options), is_main)
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        except BaseException as error:
            _end_progress_bars(trainer)  # so that the error starts on a line of its own
            # The failed run's monitoring is finished now, not at the interpreter's exit (a notebook's may
            # be hours away), and before the error is printed: on a full disk it may fail the same way.
            _close_monitor(trainer)
            reason = _write_failure(error, output_dir)
            if reason is None:
                raise
            raise SO8TError(f"training stopped, cannot write: {reason}{kept_checkpoints(output_dir)}") from None
        interruption = stop.interruption()
        if interruption is not None:
            raise interruption
        bad = nonfinite_parameters(trainer.model)
        if max_over_ranks(len(bad), trainer.args.device):  # every rank checks its shards; all stop alike
            which = f"{len(bad)} trainable tensors" if bad else "trainable tensors on another rank"
            example = f" (e.g. {bad[0]})" if bad else ""
            raise SO8TError(f"training diverged: {which} hold NaN or infinity at step {trainer.state.global_step}"
                            f"{example}; nothing published, try a lower --learning-rate"
                            f"{kept_checkpoints(output_dir, 'checkpoints with finite weights')}")
        if before_publish is not None:
            before_publish()
        trainable = whole_trainable_state(trainer.model)  # every rank: under FSDP they are gathered
        failure = None
        with whole_gates(trainer.model, handle):
            if is_main:
                try:
                    _publish(output_dir, lambda directory: write_final(directory, trainable))
                except BaseException as error:
                    failure = error
        # Every rank leaves together, once rank 0 has published or failed to: a rank that ends while another
        # still works can take that one down (torchrun stops every rank as soon as one has failed).
        if max_over_ranks(int(failure is not None), trainer.args.device) and failure is None:
            raise SO8TError("training finished, but rank 0 could not publish the final files (its error says why)")
        if failure is not None:
            raise failure
    return output_dir


def _publish(output_dir: Path, write_final: Callable[[Path], None]) -> None:
    try:
        publish(output_dir, write_final)
    except Exception as error:
        reason = _write_failure(error, output_dir)
        if reason is None:
            raise
        raise SO8TError(f"cannot write the final files into {output_dir}: {reason}; the previous final "
                        f"files are unchanged{kept_checkpoints(output_dir)}") from None
