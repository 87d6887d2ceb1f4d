"""Files that survive a crash or a power cut: a file is durable once its bytes and the directory entry
that names it are both fsynced. Used by the training outputs (checkpoints, the published files) and
the audit log (its key file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Makes the names in ``path`` (files created, renamed or removed there) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:  # some filesystems cannot fsync a directory; the files themselves are synced
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Every file under ``root`` and every directory entry naming them."""
    for folder, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(Path(folder))


def write_synced(path: Path, text: str) -> None:
    """Writes ``text`` into ``path`` and makes both durable before returning."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    fsync_directory(path.parent)
