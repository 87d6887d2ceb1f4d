"""α warmup: the schedule as a function of the optimizer step, and the Trainer callback that runs it
(gradient-accumulation aware, α untrained during warmup, then an ordinary Adam-trained parameter)."""

import math

import pytest
import torch
from transformers import TrainerCallback

from so8t import SO8TConfig, attach_so8t
from so8t.gates.annealing import alpha_at_step, apply_alpha_schedule
from so8t.gates.config import SCHEDULES
from so8t.training.finetune import build_training
from so8t.training.options import TrainOptions

TARGET = math.log(0.1 / 0.9)  # logit(0.1) = −2.1972
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_goes_from_alpha_init_to_the_target_logit_and_stays(schedule):
    config = SO8TConfig(warmup_steps=10, schedule=schedule)
    values = [alpha_at_step(step, config) for step in range(14)]
    assert values[0] == -5.0
    assert values[10] == pytest.approx(-2.1972, abs=1e-4) and all(v == values[10] for v in values[10:])
    assert all(a < b for a, b in zip(values[:10], values[1:11]))
    assert values[5] == pytest.approx((-5.0 + TARGET) / 2)  # every shape is symmetric about mid-warmup


def test_schedule_shapes_differ_where_they_should():
    at = {s: alpha_at_step(2, SO8TConfig(warmup_steps=10, schedule=s)) for s in SCHEDULES}
    assert at["linear"] == pytest.approx(-5.0 + 0.2 * (TARGET + 5.0))
    assert -5.0 < at["sigmoid"] < at["cosine"] < at["linear"]  # the eased shapes start slower
    assert alpha_at_step(0, SO8TConfig(warmup_steps=0)) == TARGET


def test_apply_alpha_schedule_freezes_during_warmup_and_never_overwrites_after():
    from transformers import Phi3ForCausalLM

    from so8t.models.demo import build_demo_tokenizer, demo_model_config

    handle = attach_so8t(Phi3ForCausalLM(demo_model_config(build_demo_tokenizer(), **TINY)),
                         SO8TConfig(warmup_steps=4))
    apply_alpha_schedule(handle, 2)
    assert handle.bank.alpha_frozen and torch.all(handle.alpha == alpha_at_step(2, handle.config))
    apply_alpha_schedule(handle, 4)
    assert not handle.bank.alpha_frozen and torch.allclose(handle.alpha, torch.tensor(TARGET))
    with torch.no_grad():
        handle.alpha.fill_(1.5)  # as if trained
    apply_alpha_schedule(handle, 5)
    assert torch.all(handle.alpha == 1.5) and not handle.bank.alpha_frozen


class GateRecorder(TrainerCallback):
    """What α was at the start of each optimizer step, and what the optimizer held for it."""

    def __init__(self):
        self.alpha_at_step, self.alpha_grad_dropped, self.alpha_has_adam_state, self.theta_grad_norm = [], [], [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.handle = find_handle(model)
        self.alpha_at_step.append(self.handle.alpha.detach().clone())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.alpha_grad_dropped.append(self.handle.alpha.grad is None)
        self.theta_grad_norm.append(self.handle.theta.grad.norm().item())

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.alpha_has_adam_state.append(bool(optimizer.state.get(self.handle.alpha)))


def find_handle(model):
    from so8t import find_so8t_handle

    return find_so8t_handle(model)


@pytest.fixture(scope="module")
def annealed_run(tmp_path_factory):
    recorder = GateRecorder()
    options = TrainOptions(model="demo", output_dir=str(tmp_path_factory.mktemp("run")), max_steps=8, grad_accum=2, batch_size=4,
                           warmup_steps=4, max_length=64, learning_rate=3e-3, monitor=None,
                           extra_callbacks=[recorder])
    training = build_training(options, options.output_dir, demo_overrides=TINY)
    theta_before = training.handle.theta.detach().clone()
    training.trainer.train()
    return training, recorder, theta_before


def test_alpha_follows_the_schedule_per_optimizer_step_during_warmup(annealed_run):
    training, recorder, _ = annealed_run
    config = training.handle.config
    assert len(recorder.alpha_at_step) == 8  # optimizer steps, not the 16 micro-batches
    for step in range(config.warmup_steps + 1):
        expected = torch.full((2,), alpha_at_step(step, config))
        torch.testing.assert_close(recorder.alpha_at_step[step], expected, rtol=0, atol=1e-6)
    assert recorder.alpha_grad_dropped == [True] * 4 + [False] * 4
    assert recorder.alpha_has_adam_state == [False] * 4 + [True] * 4


def test_after_warmup_alpha_is_trained_from_fresh_adam_moments(annealed_run):
    training, recorder, _ = annealed_run
    warmup, learning_rate = training.handle.config.warmup_steps, training.options.learning_rate
    first_move = (recorder.alpha_at_step[warmup + 1] - recorder.alpha_at_step[warmup]).abs()
    # Adam's first step moves a parameter by lr·|m̂/√v̂| = lr; moments that had counted W zero-gradient
    # steps would give ~0.55·lr here instead.
    torch.testing.assert_close(first_move, torch.full_like(first_move, learning_rate), rtol=1e-3, atol=0)
    assert not torch.allclose(training.handle.alpha.detach(), torch.tensor(TARGET), atol=1e-3)


def test_theta_learns_from_the_identity(annealed_run):
    training, recorder, theta_before = annealed_run
    assert torch.all(theta_before == 0)
    assert all(norm > 0 for norm in recorder.theta_grad_norm)
    assert training.handle.theta.detach().norm() > 0.01
