"""The output directory of a ``so8t train`` run, which the run owns.

- A lock (``.so8t-train.lock``, an flock held for the whole run, with the holder's pid in it) keeps a
  second run out; the kernel drops it when its process dies, so a killed run's lock is taken over.
- While training, ``monitoring/``, ``checkpoint-<step>/`` and ``runs/`` (TensorBoard) are written in
  place: they are where the user looks during the run and stay there after an exception, Ctrl-C or kill.
- The final files (adapters, tokenizer, trainer_state.json) are written into ``.publish/`` and fsynced;
  ``.publish/.complete`` is written last, then each file is moved into place with one rename, so a file
  under its final name is always complete. A run killed while moving them is finished by the next run
  into the directory. With ``--overwrite`` the previous final files stay in place until then.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..durable import fsync_directory, fsync_tree, write_synced
from ..errors import SO8TError

LOCK_FILE = ".so8t-train.lock"
PUBLISH_DIR = ".publish"
REPLACED_DIR = ".replaced"  # the previous final files, between their replacement and their removal
COMPLETE_FILE = ".complete"  # in PUBLISH_DIR: the names to move in, written once all of them are complete
CHECKPOINT_PREFIX = "checkpoint-"
MONITORING_DIR = "monitoring"
LOGS_DIR = "runs"  # the Trainer's TensorBoard event files
TRAINER_STATE_FILE = "trainer_state.json"
NEARLY_FULL_BYTES = 1 << 20


def is_run_file(name: str) -> bool:
    """Files of the run itself, not of its final output."""
    run_files = (LOCK_FILE, PUBLISH_DIR, REPLACED_DIR, MONITORING_DIR, LOGS_DIR)
    return name in run_files or name.startswith(CHECKPOINT_PREFIX)


def nearly_full(directory: Path) -> bool:
    """Whether the filesystem of ``directory`` (or of its nearest existing parent) has under 1 MiB left:
    libraries report a full disk as their own errors (torch.save: ``RuntimeError: ... unexpected pos``)."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES


# OSErrors that mean the output cannot be written; others (a missing file, a refused connection: transformers
# raises OSError for both) are not about the disk and keep their own traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def unwritable(directory: Path, reason: str | OSError) -> SO8TError:
    if isinstance(reason, OSError):
        reason = reason.strerror if reason.filename == str(directory) else describe_os_error(reason)
    return SO8TError(f"cannot write into --output-dir {directory}: {reason}")


def describe_os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device: 'path'`` as ``path: No space left on device``."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


# -- the lock -------------------------------------------------------------------------------------
def lock_holder(directory: Path) -> int | None:
    """The pid of the live run holding ``directory``'s lock, or None (no lock, or a dead holder's)."""
    path = directory / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_pid(path)
    finally:
        os.close(descriptor)  # closing drops the shared lock, if it was taken
    return None


def _recorded_pid(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # held, but written a moment ago or not by so8t


def _in_use(directory: Path, pid: int) -> SO8TError:
    holder = f"pid {pid}" if pid > 0 else "another process"
    return SO8TError(f"--output-dir {directory} is in use by a running so8t train ({holder}); "
                     "wait for it to end or choose another directory")


def acquire_lock(directory: Path) -> int:
    """Takes ``directory``'s lock for this process; returns its file descriptor."""
    path = directory / LOCK_FILE
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise _in_use(directory, _recorded_pid(path)) from None
        # A run releasing the lock unlinks the file first: a lock on an unlinked file is no lock.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, (json.dumps({"pid": os.getpid()}) + "\n").encode())
    return descriptor


def release_lock(directory: Path, descriptor: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOCK_FILE)
    os.close(descriptor)


# -- checks and the claim -------------------------------------------------------------------------
def check_output_dir(directory: Path, overwrite: bool, resume: bool) -> None:
    """What can be checked before a run starts, writing nothing."""
    if directory.exists() and not directory.is_dir():
        raise SO8TError(f"--output-dir {directory} exists and is not a directory")
    if not directory.is_dir():
        ancestor = next(parent for parent in directory.parents if parent.exists())
        if not ancestor.is_dir():
            raise unwritable(directory, f"{ancestor} is not a directory")
        _check_writable(directory, ancestor)
        return
    _check_writable(directory, directory)
    pid = lock_holder(directory)
    if pid is not None and pid != os.getpid():
        raise _in_use(directory, pid)
    if overwrite or resume:
        return
    entries = [path for path in directory.iterdir() if path.name != LOCK_FILE]
    if entries:
        hint = (", or --resume to continue its run" if any(p.name.startswith(CHECKPOINT_PREFIX) for p in entries)
                else "")
        raise SO8TError(f"--output-dir {directory} already exists and is not empty "
                        f"(pass --overwrite to replace it{hint})")


def _check_writable(directory: Path, existing: Path) -> None:
    """Refuses an ``existing`` directory (``directory`` or its nearest existing parent) in which this
    process cannot create files. Root passes a permission check that a filesystem may still refuse
    (sysfs: EPERM): the Trainer's own makedirs reports those (build_trainer)."""
    if os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise unwritable(directory, f"{existing} is on a read-only filesystem")
    raise unwritable(directory, f"{existing} is not writable for this user")


@contextlib.contextmanager
def claimed_output_dir(directory: Path, overwrite: bool, resume: bool) -> Iterator[Path]:
    """Holds ``directory`` for a run: creates it, locks it, finishes a publish a killed run left, and with
    ``--overwrite`` removes the previous run's checkpoints and monitoring (its final files stay until
    this run publishes). The lock is released however the block ends."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = acquire_lock(directory)
    except OSError as error:
        raise unwritable(directory, error) from None
    try:
        finish_publish(directory)
        check_output_dir(directory, overwrite, resume)
        if overwrite and not resume:
            for path in directory.iterdir():
                if is_run_file(path.name) and path.name != LOCK_FILE:
                    remove_path(path)
        yield directory
    finally:
        release_lock(directory, descriptor)


# -- publishing -----------------------------------------------------------------------------------
def publish(directory: Path, write: Callable[[Path], None]) -> None:
    """``write(staging)`` writes the final files; they then replace the previous final files in
    ``directory`` (files of neither set that are not run files go too)."""
    staging = directory / PUBLISH_DIR
    remove_path(staging)
    try:
        staging.mkdir()
        write(staging)
        names = sorted(path.name for path in staging.iterdir())
        fsync_tree(staging)
        write_synced(staging / COMPLETE_FILE, json.dumps(names) + "\n")
    except BaseException:
        remove_path(staging)
        raise
    finish_publish(directory)


def finish_publish(directory: Path) -> None:
    """Moves a complete ``.publish/`` into place (idempotent: a kill at any point is finished by
    calling it again); an incomplete one is removed, leaving the previous final files as they were."""
    staging, replaced = directory / PUBLISH_DIR, directory / REPLACED_DIR
    complete = staging / COMPLETE_FILE
    if not complete.is_file():
        remove_path(staging)
        remove_path(replaced)
        return
    names = json.loads(complete.read_text())
    replaced.mkdir(exist_ok=True)
    for name in names:
        new, target = staging / name, directory / name
        if not new.exists():
            continue  # moved in before a kill
        if target.exists() or target.is_symlink():
            remove_path(replaced / name)
            target.rename(replaced / name)
        new.rename(target)
    for path in directory.iterdir():
        if path.name not in names and not is_run_file(path.name):
            path.rename(replaced / path.name)
    fsync_directory(directory)
    remove_path(staging)
    remove_path(replaced)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
