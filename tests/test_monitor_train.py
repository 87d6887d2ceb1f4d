"""``so8t train`` monitors by default (a baseline without gates too) and writes where ``so8t report``
looks; ``--no-monitor`` turns it off. Its closing lines name things as the report does."""

import argparse
import json
import logging
import math

import numpy as np
from cli_helpers import report, train
from monitor_helpers import read_metrics
from safetensors.torch import load_file

from so8t.commands.train import add_arguments, options_from_args
from so8t.gates.annealing import alpha_at_step, short_warmup_warning
from so8t.gates.config import SO8TConfig
from so8t.monitor import MonitorConfig, SO8TMonitorCallback
from so8t.monitor.schema import METRIC
from so8t.training.callbacks import build_callbacks

SMALL_RUN = ["--model", "demo", "--max-steps", "3", "--max-length", "128", "--batch-size", "2", "--warmup-steps", "2"]


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


def test_a_baseline_run_is_monitored_and_reported_without_gates(tmp_path, capsys):
    output = tmp_path / "baseline"
    assert train([*SMALL_RUN, "--no-so8t", "--output-dir", str(output), "--no-monitor-plots"]) == 0
    out = capsys.readouterr().out
    assert "SO8T adapter" not in out and "no gates (--no-so8t)" in out and "monitoring/" in out
    assert not (output / "so8t").exists()
    info, samples, _ = read_metrics(output / "monitoring" / "metrics.jsonl")
    assert not info.gated and info.layers == (1, 2, 3, 4)
    assert all(np.isfinite(sample["act_rms"]).all() and np.isnan(sample["gate"]).all() for sample in samples)
    assert report([str(output)]) == 0
    out = capsys.readouterr().out
    assert "no gates (a baseline run)" in out and "--no-monitor" not in out


def test_the_summary_names_layers_and_rotation_sizes_as_the_report_does(tmp_path, capsys, caplog):
    output = tmp_path / "run"
    arguments = ["--model", "demo", "--max-steps", "3", "--max-length", "128", "--batch-size", "2", "--warmup-steps", "10",
                 "--so8t-layers", "1,3", "--theta-init-std", "0.05", "--no-monitor-plots"]
    with caplog.at_level(logging.WARNING, logger="so8t.gates.annealing"):
        assert train([*arguments, "--output-dir", str(output)]) == 0
    reached = 1 / (1 + math.exp(-alpha_at_step(3, SO8TConfig(warmup_steps=10))))
    (warning,) = [record.getMessage() for record in caplog.records if "warmup" in record.getMessage()]
    assert f"σ(α) will reach {reached:.3g}, not the target 0.1" in warning
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gates on"))
    assert line.startswith("gates on layers 1, 3: σ(α) ")  # a list, not the range "1 … 3"
    # The same quantity as the monitor's theta_norm_max (per layer, the largest block's ‖θ_b‖₂), of the
    # saved gates (the monitor's last sample is taken before the last optimizer step).
    theta = load_file(output / "so8t" / "so8t_adapter.safetensors")["theta"].double()
    largest = theta.norm(dim=-1).amax(dim=1)
    label = METRIC["theta_norm_max"].label
    assert f"{label} {largest.min():.3f} … {largest.max():.3f}" in line
    assert report([str(output)]) == 0
    assert label in next(row for row in capsys.readouterr().out.splitlines() if row.strip().startswith("layer"))


def test_a_long_enough_run_gets_no_warmup_warning():
    assert short_warmup_warning(40, SO8TConfig(warmup_steps=40)) is None
    assert short_warmup_warning(39, SO8TConfig(warmup_steps=40)) is not None
