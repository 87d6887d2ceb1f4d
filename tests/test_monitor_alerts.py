"""Each alert fires on its fault (once), and none fires on a healthy run: on synthetic samples, and on
faults injected into a tiny gated model while it trains (NaN logits, zeroed LoRA gradients, huge θ)."""

import json

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from monitor_helpers import SYNTHETIC_INFO, make_trainer, read_metrics, synthetic_sample, tiny_gated_model
from so8t.monitor import SO8TMonitorCallback
from so8t.monitor.alerts import AlertChecker, AlertThresholds

# kind: (the sample's fault, where the alert should point)
FAULTS = {
    "nonfinite_logits": (dict(logit_nonfinite=12.0, logit_mean=float("nan")), []),
    "nonfinite_activations": (dict(act_nonfinite=np.array([0.0, 3.0, 0.0])), ["L2"]),
    "nonfinite_params": (dict(param_nonfinite=np.array([1.0, 0.0, 0.0]), lora_param_nonfinite=2.0), ["L1", "lora"]),
    "nonfinite_grads": (dict(grad_nonfinite=1.0, grad_theta=np.array([np.inf, 1e-3, 1e-3])), []),
    "orthogonality_residual": (dict(ortho_residual_max=np.array([1e-7, 1e-7, 3e-4])), ["L3"]),
    "gate_saturated": (dict(gate=np.array([0.1, 0.995, 0.1])), ["L2"]),
}


def healthy_run(checker, steps):
    return [alert for step in steps for alert in checker.check(synthetic_sample(step))]


def test_a_healthy_run_raises_nothing():
    assert healthy_run(AlertChecker(SYNTHETIC_INFO, AlertThresholds()), range(1, 2000, 10)) == []


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_fault_raises_its_alert_once(kind):
    checker = AlertChecker(SYNTHETIC_INFO, AlertThresholds())
    assert healthy_run(checker, range(10, 100, 10)) == []
    fault, where = FAULTS[kind]
    (alert,) = checker.check(synthetic_sample(100, **fault))
    assert (alert["kind"], alert["step"], alert["where"]) == (kind, 100, where)
    assert checker.check(synthetic_sample(110, **fault)) == []  # once per kind


def test_dead_gradient_needs_consecutive_zero_samples_and_ignores_frozen_groups():
    checker = AlertChecker(SYNTHETIC_INFO, AlertThresholds(dead_after=3))
    dead_lora = dict(grad_lora=np.array([0.2, 0.0, 0.3]))
    assert [checker.check(synthetic_sample(step, **dead_lora)) for step in (10, 20)] == [[], []]
    assert checker.check(synthetic_sample(30)) == []  # alive again: the streak restarts
    assert [checker.check(synthetic_sample(step, **dead_lora)) for step in (40, 50)] == [[], []]
    (alert,) = checker.check(synthetic_sample(60, **dead_lora))
    assert alert["kind"] == "dead_gradient" and alert["where"] == ["lora/L1"]
    frozen = AlertChecker(SYNTHETIC_INFO, AlertThresholds(dead_after=1))
    assert frozen.check(synthetic_sample(10, grad_alpha=np.full(3, np.nan))) == []


class InjectFault(TrainerCallback):
    def __init__(self, at_step, inject):
        self.at_step, self.inject = at_step, inject

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at_step:
            self.inject()


def train_with_fault(tmp_path, inject, at_step=3, max_steps=6, **monitor_options):
    model, handle = tiny_gated_model()
    monitor = SO8TMonitorCallback(interval=1, plots=False, **monitor_options)
    callbacks = [InjectFault(at_step, lambda: inject(model, handle))] if inject else []
    trainer = make_trainer(model, handle, tmp_path, max_steps=max_steps, monitor=monitor, callbacks=callbacks)
    trainer.train()
    _, samples, alerts = read_metrics(tmp_path / "monitoring" / "metrics.jsonl")
    summary = json.loads((tmp_path / "monitoring" / "summary.json").read_text())
    assert summary["alerts"] == alerts
    return trainer, samples, {alert["kind"]: alert for alert in alerts}


def nan_logits(model, handle):
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda module, args, output: output * float("nan"))


def zero_lora_gradients(model, handle):
    # What the bitsandbytes CPU repack bug does: the LoRA tensors silently get exactly-zero gradients.
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.register_hook(torch.zeros_like)


def huge_theta(model, handle):
    with torch.no_grad():
        handle.theta[1] += 1e4  # ‖A‖_F far beyond the ≤ 50 where so8_exp is accurate


def test_injected_nan_logits_alert_and_can_stop_training(tmp_path):
    trainer, samples, alerts = train_with_fault(tmp_path, nan_logits, stop_on_nonfinite=True)
    assert alerts["nonfinite_logits"]["step"] == 3
    assert samples[2]["logit_nonfinite"] == 4 * 16 * 300
    assert trainer.state.global_step == 3  # stopped after the step that produced them


def test_injected_zero_lora_gradients_alert_as_dead(tmp_path):
    _, samples, alerts = train_with_fault(tmp_path, zero_lora_gradients, at_step=1, max_steps=5)
    assert set(alerts) == {"dead_gradient"}
    assert alerts["dead_gradient"]["step"] == 3  # three samples in a row
    assert alerts["dead_gradient"]["where"] == ["lora/L0", "lora/L1", "lora/L2", "lora/L3"]
    assert all((sample["grad_lora"] == 0).all() and (sample["grad_theta"] > 0).all() for sample in samples)


def test_injected_huge_theta_alerts_on_the_orthogonality_residual(tmp_path):
    _, samples, alerts = train_with_fault(tmp_path, huge_theta, max_steps=4)
    alert = alerts["orthogonality_residual"]
    assert alert["step"] == 3 and alert["where"] == ["L2"]
    assert samples[1]["ortho_residual_max"].max() < 1e-6 < 1e-4 < samples[2]["ortho_residual_max"][1]


def test_healthy_training_raises_no_alert(tmp_path):
    _, samples, alerts = train_with_fault(tmp_path, None, max_steps=8)
    assert len(samples) == 8 and alerts == {}
