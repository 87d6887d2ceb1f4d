"""Appending to metrics.jsonl so that a crash costs little.

Every line goes to the OS as soon as it is written (one small write): a killed process (``kill -9``)
loses at most the line being written, which the reader then skips. ``sync()`` (fsync) runs when the
recorder flushes: a machine crash loses at most one flush interval.
"""

import os
from collections.abc import Callable
from pathlib import Path

from .records import iter_records


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None
        self._unsynced = 0

    def start_fresh(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")

    def resume(self, last_step: int, on_record: Callable[[str, dict], None]) -> None:
        """Keep the records up to ``last_step`` (handing each to ``on_record``), drop the later ones and
        a torn last line, then append. The rewrite goes through a temporary file and a rename, so a crash
        during it leaves the old file whole."""
        if not self.path.is_file():
            self.start_fresh()
            return
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as kept:
            for kind, line, record in iter_records(self.path):
                if record.get("step", 0) <= last_step:
                    kept.write(line)
                    on_record(kind, record)
            kept.flush()
            os.fsync(kept.fileno())
        os.replace(partial, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self._file.write(line + "\n")
        self._file.flush()
        self._unsynced += 1

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            os.fsync(self._file.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
