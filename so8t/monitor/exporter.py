"""Rewrites the time series files and plots of a monitoring directory, off the training thread.

Drawing the five figures of 1000 samples costs 0.5–2.5 s of CPU here; in the training thread that
would be a visible pause at every flush. A daemon thread takes the newest snapshot instead (an older
one still waiting is dropped: only the latest state matters), and after an export that took d seconds
it starts the next one no sooner than d / BUDGET later, so exporting never takes more than BUDGET of
the wall time, however often flushes come. The first export waits as if the one before had cost
FIRST_EXPORT_GUESS_S: a run shorter than that gets its files at the end only. ``finish`` waits for that
thread, ends it, and exports in the caller's thread.
"""

import logging
import threading
import time
from pathlib import Path

from .export import write_timeseries
from .plots import draw_plots
from .series import Series

logger = logging.getLogger(__name__)

BUDGET = 0.02
FIRST_EXPORT_GUESS_S = 1.0  # the measured range is 0.5–2.5 s: the first export comes 50 s into training


def export(series: Series, directory: Path, plots: bool) -> list[Path]:
    written = write_timeseries(series, directory)
    if plots:
        written += draw_plots(series, Path(directory) / "plots")
    return written


class Exporter:
    def __init__(self, directory: Path, plots: bool = True):
        self.directory = Path(directory)
        self.plots = plots
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: Series | None = None
        self._busy = False
        self._finished = False
        self._thread: threading.Thread | None = None
        self._created = time.monotonic()

    def submit(self, series: Series) -> None:
        with self._lock:
            self._pending = series
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="so8t-monitor-export", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def finish(self, series: Series) -> list[Path]:
        """The last export, in this thread, after the background one (if any) is done and gone."""
        with self._lock:
            self._pending, self._finished = None, True
            self._wake.notify_all()
            while self._busy:
                self._wake.wait()
        return export(series, self.directory, self.plots)

    def _work(self) -> None:
        not_before = self._created + FIRST_EXPORT_GUESS_S / BUDGET
        while True:
            with self._lock:
                while not self._finished and (self._pending is None or time.monotonic() < not_before):
                    self._wake.wait(timeout=max(not_before - time.monotonic(), 0) or None)
                if self._finished:
                    return
                series, self._pending, self._busy = self._pending, None, True
            started = time.monotonic()
            try:
                export(series, self.directory, self.plots)
            except Exception:  # a failed export must never stop training; the next flush retries
                logger.exception("so8t monitor: writing the time series or plots failed")
            finally:
                finished = time.monotonic()
                not_before = finished + (finished - started) / BUDGET
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()
