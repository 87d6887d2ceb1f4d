"""Where samples go once they are on the host: metrics.jsonl, the ring buffer, alerts, the running
extremes, and at each flush the time series and plots. No torch: it works on plain numbers.

Files under ``<directory>`` (the run's ``<output_dir>/monitoring``): metrics.jsonl, timeseries.npz,
timeseries.csv, timeseries.parquet (with pyarrow), plots/*.png, summary.json.
"""

import logging
import time
from pathlib import Path

from .alerts import AlertChecker, AlertThresholds
from .exporter import Exporter
from .losses import Losses
from .metrics_log import MetricsLog
from .records import (
    ALERT,
    LOSS,
    SAMPLE,
    decode_alert,
    decode_sample,
    encode_alert,
    encode_losses,
    encode_meta,
    encode_sample,
)
from .ring import RingBuffer
from .schema import RunInfo
from .summary import RunningExtremes, build_summary, write_summary

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


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
