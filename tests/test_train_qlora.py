"""QLoRA: a 4-bit NF4 base + LoRA + SO8T gates trains on CPU, with nonzero gradients on LoRA and gate
parameters at every step (the bitsandbytes CPU repack, see so8t.models.bnb_guard, would zero the LoRA ones)."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import TrainerCallback

from so8t.training.finetune import build_training
from so8t.training.options import TrainOptions

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


class GradientRecorder(TrainerCallback):
    def __init__(self):
        self.zero_lora, self.lora_count, self.theta_grad, self.alpha_grad = [], [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        lora = {name: p.grad for name, p in model.named_parameters() if "lora_" in name}
        # lora_A gets no gradient while lora_B is still its zero init (step 0).
        checked = {name: grad for name, grad in lora.items() if state.global_step > 0 or "lora_B" in name}
        self.zero_lora.append(sorted(name for name, grad in checked.items() if grad is None or not grad.any()))
        self.lora_count.append(len(checked))
        handle = self.handle
        self.theta_grad.append(handle.theta.grad.abs().sum().item())
        self.alpha_grad.append(handle.alpha.grad.abs().sum().item())


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    recorder = GradientRecorder()
    output = tmp_path_factory.mktemp("qlora")
    options = TrainOptions(model="demo", output_dir=str(output), load_in_4bit=True, max_steps=4, warmup_steps=0, batch_size=4,
                           max_length=64, monitor=None, extra_callbacks=[recorder])
    training = build_training(options, output, demo_overrides=TINY)
    recorder.handle = training.handle
    theta_before, alpha_before = training.handle.theta.detach().clone(), training.handle.alpha.detach().clone()
    training.trainer.train()
    return training, recorder, theta_before, alpha_before


def test_the_base_is_4bit_nf4_and_only_lora_and_gates_train(qlora_run):
    training, *_ = qlora_run
    linear4bit = [m for m in training.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4bit and all(m.weight.quant_type == "nf4" for m in linear4bit)
    trainable = {name for name, p in training.model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "so8t_gates" in name for name in trainable)
    assert any(name.endswith("so8t_gates.theta") for name in trainable)


def test_lora_and_gate_gradients_are_nonzero_at_every_step(qlora_run):
    _, recorder, *_ = qlora_run
    assert len(recorder.zero_lora) == 4
    assert recorder.zero_lora == [[]] * 4 and min(recorder.lora_count) > 0
    assert all(g > 0 for g in recorder.theta_grad)
    # At step 0 every R is exactly I (θ = 0), where dα = g(1 − g)⟨S, R − I⟩ vanishes.
    assert recorder.alpha_grad[0] == 0 and all(g > 0 for g in recorder.alpha_grad[1:])


def test_gates_move(qlora_run):
    training, _, theta_before, alpha_before = qlora_run
    assert not torch.equal(training.handle.theta.detach(), theta_before)
    assert not torch.equal(training.handle.alpha.detach(), alpha_before)


def test_the_embedded_4bit_base_is_named_as_a_model_built_from_a_config(qlora_run):
    """The embedded base is quantized through a temporary checkpoint, deleted right after: the adapter
    must not record that path (peft would look for it when saving, and a user when loading)."""
    training, *_ = qlora_run
    assert training.model.peft_config["default"].base_model_name_or_path is None
    assert training.model.get_base_model().config.name_or_path == ""
