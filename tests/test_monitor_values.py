"""What the monitor records on a tiny gated Phi-3 equals what an independent float64 computation over the
same tensors gives: gates, rotations, activations, logits (causal LM and classifier), gradients."""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from monitor_helpers import CLASS_LABELS, make_trainer, read_metrics, tiny_gated_model
from transformers import TrainerCallback

from so8t.gates.placement import find_decoder_layout
from so8t.monitor import SO8TMonitorCallback


class IndependentMeasurements(TrainerCallback):
    """Measures every sampled step in float64 from the raw tensors, without so8t_kernels or the probe.
    Registered after the monitor, so it sees the gradients the monitor saw."""

    def __init__(self, model, handle, sampled):
        self.model, self.handle, self.sampled = model, handle, sampled
        self.layers = find_decoder_layout(model).layers
        self.steps = {}
        self.flags_seen = []
        find_decoder_layout(model).backbone.register_forward_pre_hook(
            lambda module, args: self.flags_seen.append(handle.collect_activation_stats))

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if not self.sampled(step):
            self.current = None
            return
        self.current = {"outputs": defaultdict(list), "logits": []}
        self.hooks = [self.model.register_forward_hook(self._logits)]
        for gate, layer in enumerate(self.handle.layer_indices):
            self.hooks.append(self.layers[layer].register_forward_hook(self._gated_output(gate)))
        self.steps[step] = self.current

    def _gated_output(self, gate):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.current["outputs"][gate].append(hidden.detach().double().reshape(-1))
        return hook

    def _logits(self, module, args, output):
        self.current["logits"].append(output.logits.detach().double())

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.current is None:
            return
        for hook in self.hooks:
            hook.remove()
        measured, handle = self.current, self.handle
        theta, alpha = handle.theta.double(), handle.alpha.double()
        measured["alpha"] = alpha.numpy().copy()
        measured["gate"] = torch.sigmoid(alpha).numpy()
        blocks = theta.norm(dim=-1)
        measured["theta_norm_mean"], measured["theta_norm_max"] = blocks.mean(1).numpy(), blocks.amax(1).numpy()
        rotation = handle.last_rotation.double()
        eye = torch.eye(8, dtype=torch.float64)
        residual = (rotation.transpose(-1, -2) @ rotation - eye).norm(dim=(-2, -1))
        measured["ortho_residual_max"], measured["ortho_residual_mean"] = residual.amax(1).numpy(), residual.mean(1).numpy()
        generator = torch.zeros(*theta.shape[:2], 8, 8, dtype=torch.float64)
        rows, cols = torch.triu_indices(8, 8, offset=1)
        generator[..., rows, cols] = theta
        generator[..., cols, rows] = -theta
        exact = torch.linalg.matrix_exp(generator)  # independent of the so8_exp kernel
        measured["rotation_dist_mean"] = (exact - eye).norm(dim=(-2, -1)).mean(1).numpy()
        outputs = [torch.cat(measured["outputs"][gate]) for gate in range(len(handle.layer_indices))]
        measured["act_rms"] = np.array([math.sqrt((y * y).mean().item()) for y in outputs])
        measured["act_max_abs"] = np.array([y.abs().max().item() for y in outputs])
        logits = torch.cat([l.reshape(-1) for l in measured["logits"]])
        measured["logit_shape"] = tuple(measured["logits"][0].shape)
        measured.update(logit_mean=logits.mean().item(), logit_std=logits.std(unbiased=False).item(),
                        logit_min=logits.min().item(), logit_max=logits.max().item())
        measured["grad_theta"] = handle.theta.grad.double().norm(dim=(1, 2)).numpy()
        frozen = handle.bank.alpha_frozen
        measured["grad_alpha"] = np.full(2, np.nan) if frozen else handle.alpha.grad.double().abs().numpy()
        adapters = defaultdict(float)  # LoRA per decoder layer; the classifier head (peft modules_to_save): other
        for name, parameter in self.model.named_parameters():
            if parameter.grad is not None and "so8t_gates" not in name:
                group = f"L{name.split('.layers.')[1].split('.')[0]}" if ".layers." in name else "other"
                adapters[group] += parameter.grad.double().pow(2).sum().item()
        measured["grad_lora"] = {group: math.sqrt(total) for group, total in adapters.items()}


def train_and_compare(tmp_path, classifier: bool):
    model, handle = tiny_gated_model(classifier=classifier)
    monitor = SO8TMonitorCallback(interval=2, flush_every=2, plots=classifier)
    checker = IndependentMeasurements(model, handle, lambda step: monitor.sampled(step, 7))
    trainer = make_trainer(model, handle, tmp_path, max_steps=7, monitor=monitor, callbacks=[checker],
                           classifier=classifier, gradient_accumulation_steps=2)
    trainer.train()
    info, samples, alerts = read_metrics(tmp_path / "monitoring" / "metrics.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 4, 6, 7] == sorted(checker.steps)  # the last step too
    assert info.layers == (1, 2)
    assert info.lora_groups == ("L0", "L1", "L2", "L3") + (("other",) if classifier else ())
    assert alerts == []
    for sample in samples:
        expected = checker.steps[sample["step"]]
        for name in ("alpha", "gate", "theta_norm_mean", "theta_norm_max", "act_rms", "act_max_abs",
                     "grad_theta", "grad_alpha"):
            np.testing.assert_allclose(sample[name], expected[name], rtol=2e-5, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(sample["rotation_dist_mean"], expected["rotation_dist_mean"], rtol=1e-5)
        # The residual of an fp32 rotation is rounding noise (~1e-7): same order, measured independently.
        np.testing.assert_allclose(sample["ortho_residual_max"], expected["ortho_residual_max"], atol=3e-7)
        np.testing.assert_allclose(sample["ortho_residual_mean"], expected["ortho_residual_mean"], atol=3e-7)
        for name in ("logit_mean", "logit_std", "logit_min", "logit_max"):
            assert sample[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
        groups = expected["grad_lora"]
        np.testing.assert_allclose(sample["grad_lora"], [groups[g] for g in info.lora_groups], rtol=2e-5)
        assert sample["logit_nonfinite"] == 0 and not sample["act_nonfinite"].any()
        assert sample["grad_nonfinite"] == 0 and not sample["param_nonfinite"].any()
    # Steps 1-3 are warmup: α is frozen and its gradient is recorded as NaN, not as a dead 0.
    assert np.isnan(samples[0]["grad_alpha"]).all() and np.isfinite(samples[-1]["grad_alpha"]).all()
    # Activation statistics are computed on the forwards of sampled steps only (2 micro-batches each).
    sampled_flags = [flag for step in range(1, 8) for flag in [monitor.sampled(step, 7)] * 2]
    assert checker.flags_seen == sampled_flags
    assert handle.collect_activation_stats is False
    return checker, trainer


def test_recorded_values_match_an_independent_computation(tmp_path):
    checker, trainer = train_and_compare(tmp_path, classifier=False)
    assert checker.steps[1]["logit_shape"][-1] == 300  # vocabulary logits


def test_sequence_classifier_records_its_class_logits(tmp_path):
    checker, _ = train_and_compare(tmp_path, classifier=True)
    assert checker.steps[1]["logit_shape"] == (4, len(CLASS_LABELS))  # ALLOW / ESCALATE / DENY per sequence
    for name in ("logits", "gradients"):  # the classifier head shows up as the LoRA group "other"
        assert (tmp_path / "monitoring" / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_micro_batch_logit_stats_merge_to_those_of_all_their_logits_non_finite_ones_included():
    """A step's forwards merge into the statistics of all their logits together, also when one forward's
    logits hold NaN/inf and another's are all non-finite (it adds only to the non-finite count)."""
    from so8t.monitor.probe import SampleProbe, trainable_groups

    model, handle = tiny_gated_model()
    probe = SampleProbe(model, handle, trainable_groups(model, handle))
    generator = torch.Generator().manual_seed(3)
    forwards = [torch.randn(2, 5, 7, generator=generator) * 3 + 40, torch.randn(1, 3, 7, generator=generator) - 2,
                torch.full((1, 2, 7), float("nan")), torch.randn(3, 1, 7, generator=generator)]
    forwards[1][0, 1, 2:5] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    forwards[2][0, 0, 0] = float("inf")
    probe.begin()
    for logits in forwards:
        probe._after_model(model, (), {"logits": logits})
    probe.release()
    merged = {name: value.item() for name, value in probe._logit_moments(torch.device("cpu")).items()}
    values = torch.cat([logits.reshape(-1) for logits in forwards]).double()
    finite = values[torch.isfinite(values)]
    expected = dict(logit_mean=finite.mean().item(), logit_std=finite.std(unbiased=False).item(),
                    logit_min=finite.min().item(), logit_max=finite.max().item(),
                    logit_nonfinite=float(values.numel() - finite.numel()))
    assert merged == pytest.approx(expected, rel=1e-5, abs=1e-6)
    probe.begin()
    probe._after_model(model, (), {"logits": forwards[2]})
    probe.release()
    only_nan = probe._logit_moments(torch.device("cpu"))
    assert all(math.isnan(only_nan[name]) for name in ("logit_mean", "logit_std", "logit_min", "logit_max"))
    assert only_nan["logit_nonfinite"] == 14


def test_compact_scalars_reach_the_trainer_logs_and_reporting_callbacks(tmp_path):
    class Reporter(TrainerCallback):  # stands in for TensorBoard / W&B
        def __init__(self):
            self.logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(dict(logs))

    model, handle = tiny_gated_model()
    reporter = Reporter()
    # sampled: 1, 3 and the last step, 4; the Trainer logs every 2 steps, and also at 1 and 3 for the monitor
    trainer = make_trainer(model, handle, tmp_path, max_steps=4, monitor=SO8TMonitorCallback(interval=3, plots=False),
                           callbacks=[reporter], logging_steps=2)
    trainer.train()
    keys = {"so8t/alpha_mean", "so8t/gate_max", "so8t/ortho_max", "so8t/logit_std", "so8t/act_rms_max",
            "so8t/grad_theta_max", "so8t/grad_lora_min"}
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert [keys <= set(logged) for logged in reporter.logged[:4]] == [True, False, True, True]
    assert [keys <= set(entry) for entry in history] == [True, False, True, True]
    assert not any(key.startswith("so8t/") for key in history[1])  # step 2 was not sampled: no stale values
    _, samples, _ = read_metrics(tmp_path / "monitoring" / "metrics.jsonl")
    step_4 = next(s for s in samples if s["step"] == 4)
    assert history[3]["so8t/logit_std"] == pytest.approx(step_4["logit_std"])
    assert history[3]["so8t/gate_max"] == pytest.approx(step_4["gate"].max())


@pytest.mark.parametrize("gates", [True, False], ids=["gated", "baseline"])
def test_the_monitor_syncs_with_the_host_once_per_sample_and_never_otherwise(tmp_path, monkeypatch, gates):
    from so8t.monitor import callback as callback_module
    from so8t.monitor import probe as probe_module

    syncs_by_step = defaultdict(list)
    inside = []
    clock = {"step": 0}

    def counting(method_name):
        original = getattr(torch.Tensor, method_name)

        def wrapper(self, *args, **kwargs):
            if inside:
                syncs_by_step[clock["step"]].append(method_name)
            return original(self, *args, **kwargs)
        return wrapper

    # Everything that copies a tensor's value to the host (.numpy() only takes tensors already there).
    for name in ("cpu", "item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))

    def watched(owner, name):
        original = getattr(owner, name)

        def wrapper(self, *args, **kwargs):
            inside.append(name)
            try:
                return original(self, *args, **kwargs)
            finally:
                inside.pop()
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_log"):
        watched(callback_module.SO8TMonitorCallback, name)
    for name in ("_after_backbone", "_after_model", "_after_layer"):
        watched(probe_module.SampleProbe, name)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock["step"] = state.global_step + 1

    model, handle = tiny_gated_model(gates=gates)
    monitor = SO8TMonitorCallback(interval=3, plots=False)
    make_trainer(model, handle, tmp_path, max_steps=7, monitor=monitor, callbacks=[Clock()],
                 gradient_accumulation_steps=2).train()
    assert dict(syncs_by_step) == {1: ["cpu"], 3: ["cpu"], 6: ["cpu"], 7: ["cpu"]}  # 7: the last step
