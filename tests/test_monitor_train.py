"""``so8t train`` monitors by default and writes where ``so8t report`` looks; ``--no-monitor`` turns it off."""

import argparse
import json

from so8t.monitor import MonitorConfig, SO8TMonitorCallback
from so8t.monitor.records import read_metrics
from so8t.report import main as report
from so8t.train import add_arguments, main as train, options_from_args
from so8t.training.callbacks import build_callbacks

SMALL_RUN = ["--max-steps", "3", "--max-length", "128", "--batch-size", "2", "--warmup-steps", "2"]


def test_so8t_train_writes_monitoring_files_that_so8t_report_reads(tmp_path, capsys):
    output = tmp_path / "run"
    assert train([*SMALL_RUN, "--output-dir", str(output), "--monitor-interval", "2", "--no-monitor-plots"]) == 0
    info, samples, alerts = read_metrics(output / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in samples] == [1, 2, 3]  # the last step is always sampled
    assert info.layers == (1, 2, 3, 4) and info.interval == 2 and info.warmup_steps == 2
    assert not (output / "monitoring" / "plots").exists()
    state = json.loads((output / "trainer_state.json").read_text())
    assert any("so8t/ortho_max" in entry for entry in state["log_history"])
    capsys.readouterr()
    assert report([str(output)]) == 0
    assert "4 gated layers" in capsys.readouterr().out


def test_no_monitor_leaves_the_monitor_out_of_the_callbacks():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    handle = object()  # the callbacks only keep it
    default = options_from_args(parser.parse_args(["--monitor-interval", "7", "--monitor-stop-on-nonfinite"]))
    (monitor,) = [c for c in build_callbacks(default, handle) if isinstance(c, SO8TMonitorCallback)]
    assert monitor.config == MonitorConfig(interval=7, stop_on_nonfinite=True)
    off = options_from_args(parser.parse_args(["--no-monitor"]))
    assert off.monitor is None
    assert not any(isinstance(c, SO8TMonitorCallback) for c in build_callbacks(off, handle))
