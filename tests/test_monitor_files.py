"""The monitor's file side without a model: ring buffer, metrics.jsonl (torn lines, resume), the time
series files (pandas, Parquet, npz), plots and summary."""

import json
import math
import time

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from monitor_helpers import SYNTHETIC_INFO, read_metrics, synthetic_sample

from so8t.monitor import recorder as recorder_module
from so8t.monitor.metrics_log import MetricsFileError, MetricsLog, encode_meta, encode_sample
from so8t.monitor.recorder import Recorder
from so8t.monitor.ring import RingBuffer
from so8t.monitor.schema import METRICS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("orthogonality", "gate", "logits", "activations", "gradients")


def record_run(directory, steps, buffer_size=1000, flush_every=10, plots=True):
    recorder = Recorder(directory, SYNTHETIC_INFO, buffer_size=buffer_size, flush_every=flush_every, plots=plots)
    recorder.start(0)
    for step in steps:
        recorder.add(synthetic_sample(step))
    return recorder


def test_ring_buffer_keeps_the_last_samples_in_fixed_memory():
    ring = RingBuffer(SYNTHETIC_INFO, capacity=7)
    arrays_before = {name: values.nbytes for name, values in ring._slots.values.items()}
    for step in range(1, 1001):
        ring.push(synthetic_sample(step))
    series = ring.series()
    assert len(ring) == 7 and len(series) == 7
    assert series.steps.tolist() == list(range(994, 1001))
    assert {name: values.nbytes for name, values in ring._slots.values.items()} == arrays_before
    assert series.values["grad_lora"].shape == (7, 3)
    np.testing.assert_array_equal(series.values["act_rms"][-1], synthetic_sample(1000)["act_rms"])
    assert ring.latest()["step"] == 1000


def test_recorder_memory_is_bounded_by_buffer_size(tmp_path):
    recorder = record_run(tmp_path, range(1, 301), buffer_size=25, plots=False)
    assert len(recorder.ring) == 25
    summary = recorder.finish()
    assert summary["samples_recorded"] == 300  # the extremes still cover the whole run
    assert summary["first_step"] == 1 and summary["last_step"] == 300
    assert len(pd.read_csv(tmp_path / "timeseries.csv")) == 25
    _, samples, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert len(samples) == 300


def test_jsonl_round_trip_keeps_non_finite_values_as_strict_json(tmp_path):
    sample = synthetic_sample(40, logit_mean=math.nan, act_max_abs=np.array([1.0, math.inf, 2.0]))
    path = tmp_path / "metrics.jsonl"
    path.write_text(encode_meta(SYNTHETIC_INFO, 0, 0.0) + "\n" + encode_sample(sample) + "\n")
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    info, (loaded,), _ = read_metrics(path)
    assert info == SYNTHETIC_INFO
    assert math.isnan(loaded["logit_mean"]) and math.isnan(loaded["act_max_abs"][1])
    for metric in METRICS:
        np.testing.assert_array_equal(np.nan_to_num(loaded[metric.name], nan=-1.0),
                                      np.nan_to_num(np.asarray(sample[metric.name], float), nan=-1.0, posinf=-1.0))


def test_torn_last_line_is_skipped_but_a_bad_middle_line_is_an_error(tmp_path):
    record_run(tmp_path, range(10, 60, 10), plots=False).finish()
    path = tmp_path / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + encode_sample(synthetic_sample(60))[:57])  # a write cut short by kill -9
    _, samples, _ = read_metrics(path)
    assert [s["step"] for s in samples] == [10, 20, 30, 40, 50]
    lines = whole.splitlines(keepends=True)
    path.write_text("".join(lines[:2] + ["{not json\n"] + lines[2:]))
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl:3: not a monitor record"):
        read_metrics(path)
    path.write_text("")
    with pytest.raises(MetricsFileError, match="no meta record"):
        read_metrics(path)


def test_resume_drops_later_records_and_appends_in_step_order(tmp_path):
    first = record_run(tmp_path, range(10, 110, 10), plots=False)
    first.log.write('{"type":"sample","step":110,"epo')  # torn by a crash
    first.log.close()
    resumed = Recorder(tmp_path, SYNTHETIC_INFO, plots=False)
    resumed.start(50)  # the checkpoint was saved at step 50
    assert resumed.ring.series().steps.tolist() == [10, 20, 30, 40, 50]
    assert resumed.extremes.count == 5
    for step in range(60, 90, 10):
        resumed.add(synthetic_sample(step))
    summary = resumed.finish()
    info, samples, _ = read_metrics(tmp_path / "metrics.jsonl")
    steps = [s["step"] for s in samples]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
    assert summary["samples_recorded"] == 8 and summary["last_step"] == 80
    metas = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"type":"meta"' in line]
    assert [meta["step"] for meta in metas] == [0, 50]
    assert pd.read_csv(tmp_path / "timeseries.csv")["step"].tolist() == steps


def test_resume_keeps_the_losses_logged_up_to_the_checkpoint(tmp_path):
    first = record_run(tmp_path, range(10, 70, 10), plots=False)
    for step in range(10, 70, 10):
        first.add_losses(step, {"loss": 10.0 / step, "grad_norm": 1.0})
    first.add_losses(50, {"eval_loss": 0.5, "eval_runtime": 1.0})
    first.add_losses(60, {"eval_loss": float("nan")})  # a non-finite loss is not a point
    first.log.close()
    resumed = Recorder(tmp_path, SYNTHETIC_INFO, plots=False)
    resumed.start(50)
    assert resumed.losses.points == {"loss": [(s, 10.0 / s) for s in range(10, 60, 10)], "eval_loss": [(50, 0.5)]}
    resumed.add(synthetic_sample(60))
    resumed.add_losses(60, {"loss": 0.1})
    summary = resumed.finish()
    assert summary["losses"] == {"loss": {"step": 60, "final": 0.1, "min": 0.1},
                                 "eval_loss": {"step": 50, "final": 0.5, "min": 0.5}}
    arrays = resumed.series().losses
    assert arrays["loss"][:, 0].tolist() == [10, 20, 30, 40, 50, 60]


def test_metrics_log_resume_without_a_file_starts_fresh(tmp_path):
    log = MetricsLog(tmp_path / "sub" / "metrics.jsonl")
    log.resume(30, lambda kind, record: pytest.fail("nothing to replay"))
    log.write("{}")
    log.close()
    assert (tmp_path / "sub" / "metrics.jsonl").read_text() == "{}\n"


def test_timeseries_files_load_with_pandas_parquet_and_numpy(tmp_path):
    steps = list(range(10, 210, 10))
    record_run(tmp_path, steps, plots=False).finish()
    table = pd.read_csv(tmp_path / "timeseries.csv")
    assert table["step"].tolist() == steps
    assert {"alpha/L1", "gate/L3", "ortho_residual_max/L2", "grad_lora/other", "logit_std"} <= set(table.columns)
    expected = synthetic_sample(120)
    row = table[table["step"] == 120].iloc[0]
    assert row["act_rms/L2"] == pytest.approx(expected["act_rms"][1])
    assert row["logit_mean"] == pytest.approx(expected["logit_mean"])
    assert row["grad_alpha/L1"] == pytest.approx(expected["grad_alpha"][0])
    assert math.isnan(table[table["step"] == 20].iloc[0]["grad_alpha/L1"])  # frozen during warmup: NaN
    parquet = pd.read_parquet(tmp_path / "timeseries.parquet")
    pd.testing.assert_frame_equal(parquet, table, check_dtype=False)
    arrays = np.load(tmp_path / "timeseries.npz")
    assert arrays["step"].tolist() == steps
    assert arrays["ortho_residual_max"].shape == (len(steps), 3)
    assert arrays["grad_lora"].shape == (len(steps), 3)
    assert arrays["logit_std"].shape == (len(steps),)
    assert arrays["layers"].tolist() == [1, 2, 3] and arrays["lora_groups"].tolist() == ["L0", "L1", "other"]


def test_plots_are_valid_png_files(tmp_path):
    record_run(tmp_path, range(5, 400, 5)).finish()
    for name in PLOTS:
        path = tmp_path / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_summary_has_final_values_extremes_and_alerts(tmp_path):
    recorder = record_run(tmp_path, range(10, 60, 10), plots=False)
    recorder.add(synthetic_sample(60, ortho_residual_max=np.array([1e-7, 5e-3, 1e-7])))
    recorder.add(synthetic_sample(70))
    recorder.finish()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples_recorded"] == 7 and summary["last_step"] == 70
    assert summary["final"]["step"] == 70
    assert summary["final"]["act_rms"]["L2"] == pytest.approx(synthetic_sample(70)["act_rms"][1])
    assert summary["extremes"]["ortho_residual_max"]["max"]["L2"] == pytest.approx(5e-3)
    assert [(a["kind"], a["step"], a["where"]) for a in summary["alerts"]] == [("orthogonality_residual", 60, ["L2"])]


def test_background_exports_stay_within_their_time_budget(monkeypatch, tmp_path):
    started = []

    def slow_export(series, directory, plots):
        started.append(time.monotonic())
        time.sleep(0.05)
        return []

    monkeypatch.setattr(recorder_module, "export_files", slow_export)
    monkeypatch.setattr(recorder_module, "BUDGET", 0.2)  # after a 0.05 s export, wait 0.25 s
    monkeypatch.setattr(recorder_module, "FIRST_EXPORT_GUESS_S", 0.0)
    exporter = recorder_module.Exporter(tmp_path)
    series = RingBuffer(SYNTHETIC_INFO, 4).series()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # a flush every 10 ms
        exporter.submit(series)
        time.sleep(0.01)
    exporter.finish(series)
    in_background = started[:-1]
    assert 2 <= len(in_background) <= 4
    assert min(np.diff(in_background)) >= 0.29  # 0.05 s of work, then 0.25 s of rest
    assert started[-1] >= in_background[-1] + 0.05  # finish waited for the running export
    exporter._thread.join(timeout=5)
    assert not exporter._thread.is_alive()  # finished exporters leave no idle thread behind
