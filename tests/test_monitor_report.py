"""``so8t report <dir>``: rebuilds plots and summary from the files alone, prints the latest values per
layer, and fails with a clear message on missing or bad files."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import report as main
from monitor_helpers import SYNTHETIC_INFO, synthetic_sample
from test_monitor_files import PLOTS, PNG_SIGNATURE, record_run

from so8t.monitor.metrics_log import encode_meta
from so8t.monitor.recorder import Recorder


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("recorded") / "run"
    recorder = record_run(run / "monitoring", range(10, 110, 10), flush_every=100, plots=False)
    recorder.add(synthetic_sample(110, gate=np.array([0.1, 0.995, 0.1])))
    recorder.finish()
    return run


@pytest.fixture
def run_dir(recorded_run, tmp_path):
    return Path(shutil.copytree(recorded_run, tmp_path / "run"))


def test_report_rebuilds_plots_and_summary_and_prints_the_latest_values(run_dir, capsys):
    monitoring = run_dir / "monitoring"
    assert not (monitoring / "plots").exists()
    (monitoring / "summary.json").unlink()
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in PLOTS:
        assert (monitoring / "plots" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    summary = json.loads((monitoring / "summary.json").read_text())
    assert summary["samples_recorded"] == 11 and summary["last_step"] == 110
    assert [alert["kind"] for alert in summary["alerts"]] == ["gate_saturated"]
    assert "11 samples, steps 10 … 110" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("L")}
    assert set(rows) == {"L1", "L2", "L3", "LoRA"}
    assert rows["L2"][2] == "0.995"  # σ(α) column of the latest sample
    assert "gate_saturated" in out and str(monitoring / "plots") in out


def test_report_accepts_the_monitoring_directory_itself(run_dir, capsys):
    assert main([str(run_dir / "monitoring")]) == 0
    assert "L3" in capsys.readouterr().out


def test_report_needs_no_model_and_no_gpu(run_dir):
    code = (
        "import sys; from so8t.commands.main import main; status = main(['report', sys.argv[1]]); "
        "assert 'transformers' not in sys.modules, 'so8t report loaded transformers'; "
        "torch = sys.modules.get('torch'); "
        "assert torch is None or not torch.cuda.is_initialized(), 'so8t report initialised CUDA'; "
        "sys.exit(status)"
    )
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                            timeout=120, env=environment)
    assert result.returncode == 0, result.stderr


def test_report_into_a_closed_pipe_stops_quietly(run_dir):
    # `so8t report RUN | head`, with the reader gone before the first line: no traceback, no
    # "Exception ignored" at exit, the status a shell shows for SIGPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "so8t", "report", str(run_dir)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


def test_report_on_missing_or_bad_files_says_what_is_wrong(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    monitoring = tmp_path / "monitoring"
    monitoring.mkdir()
    (monitoring / "metrics.jsonl").write_text("this is not json\n{}\n")
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl:1: not a monitor record" in capsys.readouterr().err
    meta = encode_meta(SYNTHETIC_INFO, 0, 0.0) + "\n"
    (monitoring / "metrics.jsonl").write_text(meta + '{"type": "sample", "step": 1}\n' + meta)
    assert main([str(tmp_path)]) == 2
    assert "a record lacks a field" in capsys.readouterr().err
    (monitoring / "metrics.jsonl").write_text(meta)
    assert main([str(tmp_path)]) == 1
    assert "has no samples yet" in capsys.readouterr().err


BASELINE_INFO = replace(SYNTHETIC_INFO, gated=False, warmup_steps=None, gate_target=None)


def record_baseline(directory):
    recorder = Recorder(directory, BASELINE_INFO, flush_every=100, plots=False)
    recorder.start(0)
    for step in range(10, 60, 10):
        recorder.add(synthetic_sample(step, BASELINE_INFO))
        recorder.add_losses(step, {"loss": 5.0 / step})
    recorder.finish()


def test_report_on_a_baseline_shows_what_it_measured(tmp_path, capsys):
    record_baseline(tmp_path / "baseline" / "monitoring")
    assert main([str(tmp_path / "baseline")]) == 0
    out = capsys.readouterr().out
    assert "no gates (a baseline run): outputs of decoder layers 1 … 3 measured" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("layer"))
    assert header.split() == ["layer", "act", "rms", "act", "max|y|"]  # no gate column
    assert "training loss: 0.1 at step 50 (lowest 0.1)" in out
    assert "alerts: none" in out and "--no-monitor" not in out


def test_report_says_why_a_run_has_no_monitoring_files(tmp_path, capsys):
    (tmp_path / "trainer_state.json").write_text("{}")
    assert main([str(tmp_path)]) == 2
    assert "trained with --no-monitor" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_report_draws_several_runs_on_the_same_axes_and_says_where(run_dir, tmp_path, capsys):
    record_baseline(tmp_path / "baseline" / "monitoring")
    assert main([str(run_dir), str(tmp_path / "baseline")]) == 0
    out = capsys.readouterr().out
    target = run_dir / "monitoring" / "compare" / "baseline"
    assert f"runs on the same axes (run, baseline): {target}/ (loss.png, logits.png, activations.png, " \
           "gradients.png, gates.png)" in out
    assert all((target / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE for name in ("loss", "gates"))
    assert out.count("latest sample:") == 2  # each run's own report too
    assert "final training loss: run -, baseline 0.1" in out  # the gated run logged no loss
    assert main([str(run_dir), str(tmp_path / "baseline"), "--compare-dir", str(tmp_path / "here")]) == 0
    assert (tmp_path / "here" / "activations.png").is_file()


def test_a_diverged_run_is_recorded_and_reported_without_a_warning(recorded_run, tmp_path, capsys):
    diverged = tmp_path / "diverged"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice encountered" from the plots, say
        recorder = Recorder(diverged / "monitoring", SYNTHETIC_INFO, flush_every=100)
        recorder.start(0)
        for step in range(10, 60, 10):
            recorder.add(synthetic_sample(step))
        for step in range(60, 110, 10):  # every value NaN or infinite from step 60 on; the counts say so
            broken = synthetic_sample(step)
            broken.update({name: np.full_like(np.asarray(value, dtype=float), np.nan if step % 20 else np.inf)
                           for name, value in broken.items() if name not in ("step", "epoch", "time")})
            broken.update({name: np.full_like(np.asarray(value, dtype=float), 3.0)
                           for name, value in broken.items() if name.endswith("nonfinite")})
            recorder.add(broken)
        recorder.finish()
        assert main([str(diverged), str(recorded_run), "--compare-dir", str(tmp_path / "compare")]) == 0
    out = capsys.readouterr().out
    assert "nonfinite_logits" in out and "10 samples, steps 10 … 100" in out
    assert "orthogonality residual ‖RᵀR − I‖_F up to inf > 0.0001 in L1, L2, L3" in out
    first_layer = next(line.split() for line in out.splitlines() if line.split()[:1] == ["L1"])
    assert first_layer[1:3] == ["-", "-"]  # α and σ(α) of the diverged run's last sample: not a number
    assert sorted(path.name for path in (tmp_path / "compare").iterdir()) == [
        "activations.png", "gates.png", "gradients.png", "logits.png"]
