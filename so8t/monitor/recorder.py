"""Where samples go once they are on the host: metrics.jsonl, the ring buffer, alerts, the running
extremes, and at each flush the time series and plots. No torch: it works on plain numbers.

Files under ``<directory>`` (the run's ``<output_dir>/monitoring``): metrics.jsonl, timeseries.npz,
timeseries.csv, timeseries.parquet (with pyarrow), plots/*.png, summary.json.

Drawing the five figures of 1000 samples costs 0.5–2.5 s of CPU here; in the training thread that
would be a visible pause at every flush. The Exporter's daemon thread takes the newest snapshot instead
(an older one still waiting is dropped: only the latest state matters), and after an export that took
d seconds it starts the next one no sooner than d / BUDGET later, so exporting never takes more than
BUDGET of the wall time, however often flushes come. The first export waits as if the one before had
cost FIRST_EXPORT_GUESS_S: a run shorter than that gets its files at the end only. ``finish`` waits for
that thread, ends it, and exports in the caller's thread.
"""

import logging
import threading
import time
from pathlib import Path

from .alerts import AlertChecker, AlertThresholds
from .export import write_timeseries
from .losses import Losses
from .metrics_log import (
    ALERT,
    LOSS,
    SAMPLE,
    MetricsLog,
    decode_alert,
    decode_sample,
    encode_alert,
    encode_losses,
    encode_meta,
    encode_sample,
)
from .plots import draw_plots
from .ring import RingBuffer
from .schema import RunInfo
from .series import Series
from .summary import RunningExtremes, build_summary, write_summary

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BUDGET = 0.02  # the most of the wall time that exporting may take
FIRST_EXPORT_GUESS_S = 1.0  # the measured range is 0.5–2.5 s: the first export comes 50 s into training


class Recorder:
    def __init__(
        self, directory: Path, info: RunInfo, buffer_size: int = 1000, flush_every: int = 10,
        thresholds: AlertThresholds = AlertThresholds(), plots: bool = True,
    ):
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        self.directory = Path(directory)
        self.info = info
        self.flush_every = flush_every
        self.ring = RingBuffer(info, buffer_size)
        self.extremes = RunningExtremes()
        self.alerts: list[dict] = []
        self.losses = Losses()
        self.checker = AlertChecker(info, thresholds)
        self.log = MetricsLog(self.directory / METRICS_FILE)
        self.exporter = Exporter(self.directory, plots)
        self._since_flush = 0

    def start(self, step: int) -> None:
        """Begin at optimizer step ``step``: from scratch at 0, else keep what was recorded up to ``step``
        (a resumed checkpoint) and append after it."""
        if step > 0:
            self.log.resume(step, self._replay)
        else:
            self.log.start_fresh()
        self.log.write(encode_meta(self.info, step, time.time()))

    def _replay(self, kind: str, record: dict) -> None:
        if kind == SAMPLE:
            sample = decode_sample(record)
            self.ring.push(sample)
            self.extremes.add(sample)
        elif kind == ALERT:
            self.alerts.append(decode_alert(record))
            self.checker.raised.add(record["kind"])
        elif kind == LOSS:
            self.losses.add(record["step"], record)

    def add_losses(self, step: int, logs: dict) -> None:
        """Record the training or eval loss among the Trainer's ``logs`` at ``step``, if there is one."""
        found = self.losses.add(step, logs)
        if found:
            self.log.write(encode_losses(step, found))

    def add(self, sample: dict) -> list[dict]:
        """Record one sample; returns the alerts it raised for the first time."""
        self.log.write(encode_sample(sample))
        self.ring.push(sample)
        self.extremes.add(sample)
        raised = self.checker.check(sample)
        for alert in raised:
            logger.warning("so8t monitor alert at step %d: %s", alert["step"], alert["message"])
            self.log.write(encode_alert(alert))
        self.alerts += raised
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()
        return raised

    def flush(self) -> None:
        """fsync metrics.jsonl and rewrite the time series and plots in the background."""
        self.log.sync()
        self._since_flush = 0
        if len(self.ring):
            self.exporter.submit(self.series())

    def series(self):
        """The samples in memory and every loss: what the exporter writes and draws."""
        series = self.ring.series()
        series.losses = self.losses.arrays()
        return series

    def finish(self) -> dict:
        """Final flush, files rewritten in this thread, summary.json; the recorder is closed after."""
        self.log.close()
        if len(self.ring):
            self.exporter.finish(self.series())
        summary = build_summary(self.info, self.extremes, self.ring.latest(), self.alerts, self.losses)
        write_summary(self.directory / SUMMARY_FILE, summary)
        return summary


def export_files(series: Series, directory: Path, plots: bool) -> list[Path]:
    """timeseries.* and (with ``plots``) plots/*.png, in the caller's thread."""
    written = write_timeseries(series, directory)
    if plots:
        written += draw_plots(series, Path(directory) / "plots")
    return written


class Exporter:
    """Rewrites the time series and plots of a monitoring directory in a daemon thread (see above)."""

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
        return export_files(series, self.directory, self.plots)

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
                export_files(series, self.directory, self.plots)
            except Exception:  # a failed export must never stop training; the next flush retries
                logger.exception("so8t monitor: writing the time series or plots failed")
            finally:
                finished = time.monotonic()
                not_before = finished + (finished - started) / BUDGET
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()
