"""The bitsandbytes CPU repack hazard: on CPUs with avx512_bf16, an eval-mode no-grad forward of a 4-bit
layer rewrites its weight for an inference kernel without a backward, and LoRA gradients become exactly
zero. These tests show it happens with the installed bitsandbytes, that so8t.models.bnb_guard prevents and
undoes it, and that so8t's own paths (train, an eval before training, serve then train in one process)
keep every LoRA gradient."""

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback

from so8t.data.dataset import TokenizedDataset, bundled_dataset_path, read_jsonl
from so8t.models.bnb_guard import keep_4bit_weights_trainable
from so8t.models.loading import load_model_and_tokenizer
from so8t.training.finetune import build_training
from so8t.training.options import TrainOptions

REPACKING_CPU = bool(has_avx512bf16())
needs_repacking_cpu = pytest.mark.skipif(
    not REPACKING_CPU,
    reason="this CPU lacks avx512_bf16: bitsandbytes never repacks 4-bit weights for CPU inference here, "
           "so the hazard cannot occur (the guard and so8t path tests still run)")


def _repacked(model) -> int:
    return sum(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()
               if isinstance(m, Linear4bit))


def _lora_b_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if "lora_B" in name}


def _eval_forward(model) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (2, 16)))


def _zero(gradients: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name, grad in gradients.items() if not grad.any())


def _plain_qlora_model():
    """The embedded demo in 4-bit with LoRA added the usual peft way, without so8t's guard. (Its default
    shapes: bitsandbytes' repack fails outright on layers narrower than its 64-wide blocks.)"""
    options = TrainOptions(model="demo", load_in_4bit=True, monitor=None)
    model, _ = load_model_and_tokenizer(**options.base_model_arguments())
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


@needs_repacking_cpu
def test_installed_bitsandbytes_zeroes_lora_gradients_after_an_eval_forward_and_the_guard_undoes_it():
    model = _plain_qlora_model()
    layers = sum(isinstance(m, Linear4bit) for m in model.modules())
    fresh = _lora_b_gradients(model)  # a training forward does not repack
    assert _repacked(model) == 0 and not _zero(fresh)

    _eval_forward(model)
    assert _repacked(model) == layers
    assert _zero(_lora_b_gradients(model)), "bitsandbytes no longer drops gradients after an eval forward"

    assert keep_4bit_weights_trainable(model) == layers
    assert _repacked(model) == 0
    restored = _lora_b_gradients(model)
    assert not _zero(restored)
    # The inverse is bitsandbytes' best effort: the repack rounded the block scales to bf16 (~0.5 % here).
    for name in fresh:
        assert (restored[name] - fresh[name]).norm() <= 0.02 * fresh[name].norm(), name


def test_the_guard_keeps_gradients_bit_identical_through_an_eval_forward():
    model = _plain_qlora_model()
    assert keep_4bit_weights_trainable(model) == 0  # nothing was repacked yet
    before = _lora_b_gradients(model)
    _eval_forward(model)
    assert _repacked(model) == 0
    after = _lora_b_gradients(model)
    assert not _zero(after) and all(torch.equal(before[name], after[name]) for name in before)


def test_the_guard_leaves_a_model_without_4bit_layers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = model[0].weight.detach().clone()
    assert keep_4bit_weights_trainable(model) == 0
    assert torch.equal(model[0].weight, before)


class LoraGradientRecorder(TrainerCallback):
    def __init__(self):
        self.zero = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # lora_A gets no gradient while lora_B is still its zero init (step 0).
        self.zero.append(sorted(name for name, p in model.named_parameters()
                                if ("lora_B" in name or (state.global_step > 0 and "lora_A" in name))
                                and (p.grad is None or not p.grad.any())))


def _train_4bit(tmp_path, evaluate_first: bool) -> LoraGradientRecorder:
    recorder = LoraGradientRecorder()
    options = TrainOptions(model="demo", output_dir=str(tmp_path), load_in_4bit=True, max_steps=3, warmup_steps=0, batch_size=2,
                           max_length=48, monitor=None, extra_callbacks=[recorder])
    training = build_training(options, tmp_path)
    if evaluate_first:  # what an eval dataset does before the first step: eval mode, no grad, every layer
        eval_rows = TokenizedDataset(training.tokenizer, read_jsonl(bundled_dataset_path())[:4], options.max_length)
        assert "eval_loss" in training.trainer.evaluate(eval_dataset=eval_rows)
    training.trainer.train()
    assert _repacked(training.model) == 0
    return recorder


@pytest.mark.parametrize("evaluate_first", [False, True], ids=["train", "eval-then-train"])
def test_so8t_training_keeps_every_lora_gradient(tmp_path, evaluate_first):
    recorder = _train_4bit(tmp_path, evaluate_first)
    assert recorder.zero == [[]] * 3


def test_serving_then_training_in_one_process_keeps_every_lora_gradient(tmp_path):
    from serve_helpers import complete

    from so8t.serve.engines.hf import HFEngine

    engine = HFEngine.load()
    assert complete(engine, "What is 2 + 3?", 4).new_tokens > 0
    engine.shutdown()
    recorder = _train_4bit(tmp_path, evaluate_first=False)
    assert recorder.zero == [[]] * 3


def _train_command(output, *extra: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from so8t.commands.main import main

    assert main(["train", "--model", "demo", "--load-in-4bit", "--max-steps", "3", "--batch-size", "2", "--max-length", "48",
                 "--no-monitor", "--data", str(bundled_dataset_path()), "--output-dir", str(output), *extra]) == 0
    return load_file(output / "adapter_model.safetensors")


def test_so8t_train_evaluating_before_and_during_training_trains_exactly_as_without(tmp_path):
    """The command as a user runs it. Without the guard the eval before the first step repacks every
    4-bit layer: at step 0, 12 of 24 LoRA B gradients are zero, and from then on every gradient through
    the frozen base is dropped (B's still move through the LoRA path of later layers, so "B moved" would
    not notice). With it, evaluating changes nothing in training: the adapters are bit-identical."""
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("".join(bundled_dataset_path().read_text().splitlines(keepends=True)[:6]))
    evaluated = _train_command(tmp_path / "evaluated", "--eval-data", str(eval_data), "--eval-steps", "1")
    plain = _train_command(tmp_path / "plain")
    assert evaluated.keys() == plain.keys() and any("lora_B" in name for name in plain)
    assert not [name for name in plain if not torch.equal(evaluated[name], plain[name])]
