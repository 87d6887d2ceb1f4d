"""Shared by the tests/test_monitor_*.py files: a tiny gated Phi-3 with LoRA and a Trainer around it,
synthetic samples for the tests that need no model, and metrics.jsonl read back as plain tuples."""

import math

import numpy as np

from so8t.monitor.metrics_log import read_run
from so8t.monitor.schema import EPOCH, METRICS, SCALAR, STEP, TIME, RunInfo

VOCAB = 300
SEQUENCE = 16
CLASS_LABELS = ("ALLOW", "ESCALATE", "DENY")


def read_metrics(path) -> tuple[RunInfo, list[dict], list[dict]]:
    """The latest run info, every sample (in file order) and every alert of a metrics.jsonl."""
    run = read_run(path)
    return run.info, run.samples, run.alerts


def tiny_config(**overrides):
    from transformers import Phi3Config

    values = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return Phi3Config(**(values | overrides))


def tiny_gated_model(classifier: bool = False, seed: int = 0, warmup_steps: int = 3, gates: bool = True):
    """(peft model, SO8T handle): a 4-layer Phi-3 (gates on layers 1 and 2) with LoRA on attention;
    ``gates=False``: the same without gates (handle None), a baseline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3ForCausalLM, Phi3ForSequenceClassification

    from so8t.gates.config import SO8TConfig
    from so8t.gates.placement import attach_so8t

    torch.manual_seed(seed)
    if classifier:
        config = tiny_config(num_labels=len(CLASS_LABELS), id2label=dict(enumerate(CLASS_LABELS)),
                             label2id={label: i for i, label in enumerate(CLASS_LABELS)})
        model = Phi3ForSequenceClassification(config)
        lora = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], task_type="SEQ_CLS")
    else:
        model = Phi3ForCausalLM(tiny_config())
        lora = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"])
    peft_model = get_peft_model(model, lora)
    if not gates:
        return peft_model, None
    handle = attach_so8t(peft_model, SO8TConfig(warmup_steps=warmup_steps, theta_init_std=0.05))
    return peft_model, handle


class TokenDataset:
    """Deterministic random token sequences; labels are the inputs (causal LM) or a class id."""

    def __init__(self, size: int = 64, classifier: bool = False):
        self.size = size
        self.classifier = classifier

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        import torch

        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(2, VOCAB, (SEQUENCE,), generator=generator)
        label = torch.tensor(index % len(CLASS_LABELS)) if self.classifier else ids
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}


def make_trainer(model, handle, output_dir, max_steps: int, monitor=None, callbacks=(), classifier=False,
                 eval_dataset=None, **arguments):
    from transformers import Trainer, TrainingArguments

    from so8t.gates.annealing import AlphaAnnealingCallback

    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=max_steps, logging_steps=2,
        save_strategy="no", report_to=[], learning_rate=5e-3, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(
        model=model, args=TrainingArguments(**(values | arguments)),
        train_dataset=TokenDataset(classifier=classifier), eval_dataset=eval_dataset,
        callbacks=[AlphaAnnealingCallback(handle)] * (handle is not None) + list(callbacks),
    )
    if monitor is not None:
        monitor.add_to(trainer)
    return trainer


SYNTHETIC_INFO = RunInfo(
    layers=(1, 2, 3), lora_groups=("L0", "L1", "other"), interval=10, warmup_steps=30, gate_target=0.1,
    residual_threshold=1e-4,
)


def synthetic_sample(step: int, info: RunInfo = SYNTHETIC_INFO, **changes) -> dict:
    """A healthy-looking sample: small residuals, σ(α) ramping to the target, finite values, live gradients
    (NaN gate metrics for a run without gates)."""
    rng = np.random.default_rng(step)
    sample = {STEP: step, EPOCH: step / 100, TIME: 1.7e9 + step}
    for metric in METRICS:
        width = info.width(metric)
        sample[metric.name] = 0.0 if metric.axis == SCALAR else np.zeros(width)
    layers = len(info.layers)
    warmup = info.warmup_steps or 30
    gate = 0.0067 + (0.1 - 0.0067) * min(step / warmup, 1.0)
    sample.update(
        alpha=np.full(layers, math.log(gate / (1 - gate))), gate=np.full(layers, gate),
        ortho_residual_max=rng.uniform(1e-7, 3e-7, layers), ortho_residual_mean=rng.uniform(5e-8, 1e-7, layers),
        theta_norm_mean=np.full(layers, 0.1 + step / 1000), theta_norm_max=np.full(layers, 0.2 + step / 1000),
        rotation_dist_mean=np.full(layers, 0.15), act_rms=rng.uniform(0.5, 1.0, layers),
        act_max_abs=rng.uniform(2.0, 4.0, layers), grad_theta=rng.uniform(1e-3, 1e-2, layers),
        grad_alpha=np.full(layers, np.nan) if step <= warmup else rng.uniform(1e-4, 1e-3, layers),
        grad_lora=rng.uniform(0.1, 0.3, len(info.lora_groups)),
        logit_mean=0.01 * step, logit_std=1.0, logit_min=-4.0, logit_max=4.0,
        entropy=np.nan, top1_accuracy=np.nan,  # measured by the fused loss only, as with the model's own loss
    )
    if not info.gated:  # a baseline records no gate metric
        sample.update({metric.name: np.full(layers, np.nan) for metric in METRICS if metric.gates_only})
    sample.update(changes)
    return sample
