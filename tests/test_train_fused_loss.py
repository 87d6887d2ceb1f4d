"""so8t train's fused loss: the same loss and gradients as the model's own, no logits tensor, the monitor's
logit statistics from the op on sampled steps only, and a one-line fall-back where it cannot be exact."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
from fused_loss_helpers import assert_loss_curves_agree, train_losses
from monitor_helpers import SYNTHETIC_INFO, synthetic_sample
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

import so8t.models.fused_loss as fused_loss_module
from so8t.gates.placement import unwrap_peft
from so8t.models.demo import build_demo_tokenizer, demo_model_config
from so8t.models.fused_loss import (
    FusedCausalLMOutput,
    apply_fused_loss,
    fused_loss_state,
    revert_fused_loss,
    set_fused_loss_stats,
    unsupported_reason,
)
from so8t.monitor import SO8TMonitorCallback
from so8t.monitor.plots import build_figures
from so8t.monitor.series import Series
from so8t.training.finetune import build_training
from so8t.training.options import TrainOptions, add_arguments, options_from_args
from so8t_kernels import logit_stats

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
OPTIONS = TrainOptions(model="demo", eval_fraction=0, max_steps=6, batch_size=4, max_length=64, warmup_steps=2, learning_rate=1e-2, monitor=None)


@pytest.fixture(scope="module")
def loss_curves(tmp_path_factory):
    fused = train_losses(OPTIONS, tmp_path_factory.mktemp("fused"), demo_overrides=TINY)
    own = train_losses(replace(OPTIONS, fused_loss=False), tmp_path_factory.mktemp("own"), demo_overrides=TINY)
    return fused, own


def test_loss_curves_with_and_without_the_fused_loss_agree(loss_curves):
    fused, own = loss_curves
    assert_loss_curves_agree(fused, own, rtol=1e-4)
    assert fused[-1] < fused[0] - 0.05, f"the run did not learn: {fused}"


def batch(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, min(vocab, 256), (3, 19), generator=generator)
    labels = input_ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 15:] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def tiny_causal_lm(**overrides):
    torch.manual_seed(0)
    config = demo_model_config(build_demo_tokenizer(), **TINY, **overrides)
    return AutoModelForCausalLM.from_config(config)


def expected_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Entropy and top-1 accuracy of the model's own logits over the tokens its loss scores."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    rows = logits.reshape(-1, logits.shape[-1]).double()[targets != -100]
    probs = rows.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    accuracy = (rows.argmax(-1) == targets[targets != -100]).double().mean().item()
    return entropy, accuracy


@pytest.mark.parametrize("case", ["untied head", "tied embeddings, all weights trained", "padded vocabulary"])
def test_fused_loss_gradients_and_stats_equal_the_models_own(case):
    overrides = {"tied embeddings, all weights trained": dict(tie_word_embeddings=True),
                 # Phi-3 style: 37 head rows no token ever has; they still take part in the softmax.
                 "padded vocabulary": dict(vocab_size=len(build_demo_tokenizer()) + 37)}.get(case, {})
    model = tiny_causal_lm(**overrides)
    if case != "tied embeddings, all weights trained":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lm_head" not in name and "embed" not in name)  # a frozen head, as with LoRA
    model.train()
    inputs = batch(model.config.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]

    own = model(**inputs)
    own_grads = torch.autograd.grad(own.loss, trainable)
    assert apply_fused_loss(model) is None
    set_fused_loss_stats(model, True)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    fused = model(**inputs)
    fused_grads = torch.autograd.grad(fused.loss, trainable)

    assert isinstance(fused, FusedCausalLMOutput) and fused.logits is None and not head_calls
    torch.testing.assert_close(fused.loss, own.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # The op's statistics are logit_stats of the logits the model materialises, to fp32 tolerance.
    expected = logit_stats(own.logits.detach())
    torch.testing.assert_close(fused.logit_stats[:5], expected, rtol=1e-5, atol=1e-6)
    assert fused.num_logits == own.logits.numel()
    entropy, accuracy = expected_predictions(own.logits.detach(), inputs["labels"])
    assert fused.logit_stats[5].item() == pytest.approx(entropy, rel=1e-5)
    assert fused.logit_stats[6].item() == pytest.approx(accuracy, abs=1e-6)
    assert fused.scored_tokens.item() == (inputs["labels"][:, 1:] != -100).sum().item()

    set_fused_loss_stats(model, False)
    assert model(**inputs).logit_stats is None, "no statistics work when the monitor does not sample"
    model.eval()
    with torch.no_grad():
        assert model(**inputs).logits is not None, "eval mode runs the model's own forward"
    revert_fused_loss(model)
    model.train()
    assert type(model(**inputs)).__name__ == "CausalLMOutputWithPast"


def test_gradient_accumulation_divides_by_the_items_of_the_whole_batch():
    model = tiny_causal_lm()
    model.train()
    inputs = batch(model.config.vocab_size, seed=1)
    items = torch.tensor(97)
    own = model(**inputs, num_items_in_batch=items).loss
    apply_fused_loss(model)
    torch.testing.assert_close(model(**inputs, num_items_in_batch=items).loss, own, rtol=1e-6, atol=1e-6)


def test_the_monitor_reads_the_ops_statistics_on_sampled_steps_only(tmp_path, monkeypatch):
    calls = []
    real = fused_loss_module.linear_cross_entropy

    def recording(*args, stats=None, **kwargs):
        loss = real(*args, stats=stats, **kwargs)
        calls.append(None if stats is None else stats.clone())
        return loss

    monkeypatch.setattr(fused_loss_module, "linear_cross_entropy", recording)
    options = replace(OPTIONS, max_steps=5, monitor=SO8TMonitorCallback(interval=3).config)
    training = build_training(replace(options, output_dir=str(tmp_path)), tmp_path, demo_overrides=TINY)
    head_calls = []
    unwrap_peft(training.model).get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    training.trainer.train()

    assert len(calls) == 5 and not head_calls, "one fused loss per step, and never a logits tensor"
    records = [json.loads(line) for line in (tmp_path / "monitoring" / "metrics.jsonl").read_text().splitlines()]
    samples = {r["step"]: r for r in records if r.get("type") == "sample"}
    with_stats = {step for step, stats in enumerate(calls, start=1) if stats is not None}
    assert with_stats == set(samples) and len(with_stats) < 5
    for step in with_stats:
        stats, sample = calls[step - 1], samples[step]
        for index, name in enumerate(("logit_mean", "logit_std", "logit_min", "logit_max")):
            assert sample[name] == pytest.approx(stats[index].item(), rel=1e-6), name
        assert sample["entropy"] == pytest.approx(stats[5].item(), rel=1e-6)
        assert sample["top1_accuracy"] == pytest.approx(stats[6].item(), abs=1e-7)
    assert (tmp_path / "monitoring" / "plots" / "predictions.png").is_file()


def test_entropy_and_accuracy_get_their_own_plot_when_measured():
    info = SYNTHETIC_INFO
    measured = [synthetic_sample(step, info, entropy=5.5 - step / 100, top1_accuracy=step / 200) for step in (1, 10, 20)]
    figures = dict(build_figures(Series.from_samples(info, measured)))
    entropy_ax, accuracy_ax = figures["predictions"].axes[:2]
    assert entropy_ax.get_ylabel() == "nats" and accuracy_ax.get_ylabel() == "fraction"
    assert list(accuracy_ax.lines[0].get_ydata()) == [0.005, 0.05, 0.1]
    unmeasured = [synthetic_sample(step, info) for step in (1, 10)]
    assert "predictions" not in dict(build_figures(Series.from_samples(info, unmeasured)))


def test_architectures_it_cannot_compute_exactly_keep_their_own_loss():
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0))
    assert "final_logit_softcapping=30.0" in apply_fused_loss(gemma2)
    assert fused_loss_state(gemma2) is None
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    assert unsupported_reason(llama) is None
    llama.config.model_type = "my_new_arch"
    assert "'my_new_arch' is not one known" in unsupported_reason(llama)


def test_a_lora_head_falls_back_with_one_line(tmp_path, capsys):
    options = replace(OPTIONS, lora_targets=["qkv_proj", "lm_head"], output_dir=str(tmp_path))
    training = build_training(options, tmp_path, demo_overrides=TINY)
    assert fused_loss_state(training.model) is None
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("so8t train:")]
    assert lines == ["so8t train: the model's own loss is used (--no-fused-loss implied): its LM head is a "
                     "peft.tuners.lora.layer.Linear (LoRA-wrapped or quantised?), not a plain torch.nn.Linear"]


def test_no_fused_loss_restores_the_models_own_loss(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([])).fused_loss is True
    options = options_from_args(parser.parse_args(["--model", "demo", "--no-fused-loss", "--output-dir", str(tmp_path)]))
    assert options.fused_loss is False
    training = build_training(replace(options, max_steps=1), tmp_path, demo_overrides=TINY)
    assert fused_loss_state(training.model) is None
    fused = build_training(replace(options, fused_loss=True, max_steps=1), tmp_path, demo_overrides=TINY)
    assert fused_loss_state(fused.model) is not None
