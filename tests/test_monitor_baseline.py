"""The monitor on a model without gates (a baseline run): the same files and columns, gate metrics NaN,
activations measured at the decoder layers' outputs where the gates would be; and the Trainer's
training and eval losses, recorded for gated and baseline runs alike."""

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from monitor_helpers import TokenDataset, make_trainer, read_metrics, tiny_gated_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback

from so8t.gates.placement import find_decoder_layout
from so8t.monitor import SO8TMonitorCallback
from so8t.monitor.metrics_log import read_run
from so8t.monitor.schema import METRICS

GATE_ONLY = [metric.name for metric in METRICS if metric.gates_only]


class LayerOutputs(TrainerCallback):
    """rms and max |y| of decoder layers' outputs per step, in float64, without so8t_kernels."""

    def __init__(self, model, layers):
        self.steps = {}
        modules = find_decoder_layout(model).layers
        for column, layer in enumerate(layers):
            modules[layer].register_forward_hook(self._hook(column))

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = self.steps.setdefault(state.global_step + 1, {})

    def _hook(self, column):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).detach().double()
            self.current.setdefault(column, []).append(hidden.reshape(-1))
        return hook


def test_a_model_without_gates_records_the_same_columns(tmp_path):
    model, handle = tiny_gated_model(gates=False)
    assert handle is None
    checker = LayerOutputs(model, [1, 2])
    trainer = make_trainer(model, None, tmp_path, max_steps=3, monitor=SO8TMonitorCallback(interval=1),
                           callbacks=[checker], logging_steps=1, gradient_accumulation_steps=2)
    trainer.train()
    info, samples, alerts = read_metrics(tmp_path / "monitoring" / "metrics.jsonl")
    assert not info.gated and info.layers == (1, 2) and info.warmup_steps is None  # 1 … L−2 of 4 layers
    assert [sample["step"] for sample in samples] == [1, 2, 3] and alerts == []
    for sample in samples:
        outputs = [torch.cat(checker.steps[sample["step"]][column]) for column in range(2)]
        np.testing.assert_allclose(sample["act_rms"], [math.sqrt((y * y).mean().item()) for y in outputs], rtol=1e-5)
        np.testing.assert_allclose(sample["act_max_abs"], [y.abs().max().item() for y in outputs], rtol=1e-6)
        assert not sample["act_nonfinite"].any() and sample["logit_nonfinite"] == 0
        assert np.isfinite(sample["logit_std"]) and (sample["grad_lora"] > 0).all()
        for name in GATE_ONLY:
            assert np.isnan(sample[name]).all(), name
    table = pd.read_csv(tmp_path / "monitoring" / "timeseries.csv")
    assert {"alpha/L1", "gate/L2", "act_rms/L1", "logit_std", "grad_lora/L0"} <= set(table.columns)
    assert table["gate/L1"].isna().all() and table["act_rms/L2"].notna().all()
    plots = sorted(path.stem for path in (tmp_path / "monitoring" / "plots").glob("*.png"))
    assert plots == ["activations", "gradients", "logits", "loss"]


def test_training_and_eval_losses_are_recorded_as_the_trainer_logs_them(tmp_path):
    model, handle = tiny_gated_model()
    trainer = make_trainer(model, handle, tmp_path, max_steps=5, monitor=SO8TMonitorCallback(interval=10),
                           eval_dataset=TokenDataset(size=8), eval_strategy="steps", eval_steps=2, logging_steps=2)
    trainer.train()
    run = read_run(tmp_path / "monitoring" / "metrics.jsonl")
    assert [sample["step"] for sample in run.samples] == [1, 5]  # a run shorter than the interval: its end too
    history = trainer.state.log_history
    expected = {key: [(entry["step"], pytest.approx(entry[key])) for entry in history if key in entry]
                for key in ("loss", "eval_loss")}
    assert [step for step, _ in expected["eval_loss"]][:2] == [2, 4]
    assert run.losses.points == expected
    summary = (tmp_path / "monitoring" / "summary.json").read_text()
    assert '"eval_loss"' in summary and '"final"' in summary


def _checkpoint_layer_calls(model) -> None:
    """Checkpoints each decoder layer's ``__call__``, hooks included, reentrant, as transformers 4 did
    (and custom models still may): backward then re-runs every layer's forward hooks."""
    model.enable_input_require_grads()  # a reentrant checkpoint passes gradients only to inputs that need them
    for layer in find_decoder_layout(model).layers:
        class CallCheckpointed(type(layer)):
            def __call__(self, *args, **kwargs):
                return checkpoint(partial(nn.Module.__call__, self, **kwargs), *args, use_reentrant=True)

        layer.__class__ = CallCheckpointed


def _activation_samples(output_dir, gates: bool, checkpointing: str | None) -> list[dict]:
    model, handle = tiny_gated_model(gates=gates)
    if checkpointing == "layer calls":
        _checkpoint_layer_calls(model)
    trainer = make_trainer(model, handle, output_dir, max_steps=2, monitor=SO8TMonitorCallback(interval=1),
                           logging_steps=1, gradient_accumulation_steps=2,
                           gradient_checkpointing=checkpointing == "transformers")
    trainer.train()
    return read_metrics(output_dir / "monitoring" / "metrics.jsonl")[1]


@pytest.mark.parametrize("checkpointing", ["transformers", "layer calls"])
@pytest.mark.parametrize("gates", [False, True], ids=["baseline", "gated"])
def test_gradient_checkpointing_measures_each_layer_once_per_forward(gates, checkpointing, tmp_path):
    plain = _activation_samples(tmp_path / "plain", gates, None)
    recomputed = _activation_samples(tmp_path / "checkpointed", gates, checkpointing)
    assert [sample["step"] for sample in recomputed] == [1, 2]
    for expected, sample in zip(plain, recomputed):
        np.testing.assert_allclose(sample["act_rms"], expected["act_rms"], rtol=1e-5)
        np.testing.assert_allclose(sample["act_max_abs"], expected["act_max_abs"], rtol=1e-5)
        np.testing.assert_array_equal(sample["act_nonfinite"], expected["act_nonfinite"])
