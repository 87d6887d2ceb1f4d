"""``so8t train --task classify``: trains the safety judge, a sequence classifier with SO(8) gates.

With no ``--model`` it adds LoRA to SmolLM2-135M-Instruct's sequence-classification model (the head is
trained in full) and trains it on the bundled ``data/safety.jsonl``; any other ``--model`` the same way.
``--model demo`` trains the random demo Phi-3 with a 3-class head from scratch instead (every weight
trainable), in seconds on a CPU. The SO8T monitor (``--monitor-*`` options) records the class-logit
statistics and the gates as for ``--task generate``.
The output directory is the judge ``so8t serve --safety-model`` reads (see so8t.judge.judge).

Held-out rows (``--eval-data``, ``--eval-fraction``; for the bundled data by default its
``data/safety_heldout.jsonl``, built from tasks in no training row) give the accuracy on prompts the judge
never trained on, and calibrate its confidence: the temperature fitted on them (so8t.judge.calibration) is
written to ``judge_calibration.json`` next to the judge, which applies it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..errors import SO8TError
from ..gates.adapter import SO8T_ADAPTER_DIR, save_so8t_adapter
from ..gates.placement import BANK_ATTRIBUTE, attach_so8t, find_decoder_layout, resolve_layer_indices
from ..judge.calibration import Calibration, fit_temperature, write_calibration
from ..judge.data import (
    ClassificationCollator,
    ClassificationDataset,
    bundled_heldout_path,
    bundled_safety_path,
    read_labelled_jsonl,
)
from ..judge.judge import LABELS
from ..models.loading import load_model_and_tokenizer
from .heldout import split_held_out
from .options import TrainOptions
from .outputs import TRAINER_STATE_FILE
from .preflight import preflight
from .runner import run_training
from .trainer import build_trainer


def check_options(options: TrainOptions) -> TrainOptions:
    """``options`` checked (preflight) with the default model and output directory filled in."""
    unsupported = {"--load-in-4bit": options.load_in_4bit, "--bf16": options.bf16,
                   "--gradient-checkpointing": options.gradient_checkpointing}
    for flag, given in unsupported.items():
        if given:
            raise SO8TError(f"{flag} is for --task generate; --task classify trains in fp32")
    return preflight(options)


def build_classifier(options: TrainOptions):
    """The model (LoRA-wrapped when ``--model`` is given) and its tokenizer; no gates yet."""
    model, tokenizer = load_model_and_tokenizer(**options.base_model_arguments(), labels=LABELS)
    if options.is_demo:  # the random demo is trained from scratch, every weight
        return model, tokenizer
    from .lora import add_lora

    return add_lora(options, model, task_type="SEQ_CLS"), tokenizer


@torch.no_grad()
def class_logits(model, dataset: ClassificationDataset, collator: ClassificationCollator,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's class logits (fp32, CPU) for every row of ``dataset``, and the rows' labels."""
    model.eval()
    logits, labels = [], []
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        logits.append(output.logits.float().cpu())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def held_out_summary(calibration: Calibration | None) -> str:
    if calibration is None:
        return ("no held-out rows (--eval-data or --eval-fraction): accuracy on unseen prompts unknown, "
                "confidence not calibrated (temperature 1)")
    return (f"held-out accuracy {calibration.held_out_accuracy:.0%} on {calibration.held_out_rows} rows never trained "
            f"on; confidence calibrated on them: temperature {calibration.temperature:.2f}, mean NLL "
            f"{calibration.nll_before:.3f} → {calibration.nll_after:.3f}, calibration error "
            f"{calibration.ece_before:.1%} → {calibration.ece_after:.1%}")


def _save_judge(model, tokenizer, handle, trainer, directory: Path, trainable: dict | None) -> None:
    if handle is not None:
        save_so8t_adapter(handle, directory / SO8T_ADAPTER_DIR)
    if isinstance(model, PreTrainedModel):  # every weight trained: the whole model, except the gates
        whole = trainable if trainable is not None else model.state_dict()  # FSDP: gathered, not this rank's shards
        weights = {name: tensor for name, tensor in whole.items() if BANK_ATTRIBUTE not in name}
        model.save_pretrained(directory, state_dict=weights)
    else:  # LoRA: its adapter only, which has no gates in it
        model.save_pretrained(directory, state_dict=trainable)
    tokenizer.save_pretrained(directory)
    trainer.state.save_to_json(str(directory / TRAINER_STATE_FILE))


def train_classifier(options: TrainOptions) -> Path:
    """Builds, trains and publishes the judge into ``options.output_dir``; returns that directory."""
    options = check_options(options)
    if options.data is None and options.eval_data is None and options.eval_fraction is None:  # its held-out rows
        options = replace(options, eval_data=str(bundled_heldout_path()))
    examples, held_out = split_held_out(read_labelled_jsonl(options.data or bundled_safety_path()), options,
                                        read_labelled_jsonl)
    model, tokenizer = build_classifier(options)
    config = options.so8t_config() if options.gates else None
    if config is not None:
        resolve_layer_indices(config.layers, find_decoder_layout(model).num_layers)
    dataset = ClassificationDataset(tokenizer, examples, options.max_length)
    eval_dataset = ClassificationDataset(tokenizer, held_out, options.max_length) if held_out is not None else None
    collator = ClassificationCollator(tokenizer.pad_token_id)
    handle = attach_so8t(model, config) if config is not None else None

    output_dir = Path(options.output_dir).resolve()
    trainer = build_trainer(options, model, handle, output_dir, dataset, eval_dataset, collator)
    started = time.perf_counter()
    calibrations = []

    def calibrate() -> None:  # fitted on the trained judge, published with it
        if eval_dataset is not None:
            calibrations.append(fit_temperature(*class_logits(model, eval_dataset, collator, options.batch_size)))

    def write_judge(directory: Path, trainable: dict | None) -> None:
        _save_judge(model, tokenizer, handle, trainer, directory, trainable)
        if calibrations:
            write_calibration(calibrations[-1], directory)

    run_training(trainer, options, handle, write_judge, before_publish=calibrate)
    elapsed = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return output_dir
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # No accuracy on the training data: its extra pass over the rows was 7% of the demo judge's run.
    print(f"\nso8t train --task classify: {trainer.state.global_step} steps in {elapsed:.1f} s, "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}")
    print(held_out_summary(calibrations[-1] if calibrations else None))
    print(f"safety judge in {output_dir} (labels {', '.join(LABELS)}); serve it with so8t serve --safety-model "
          f"{output_dir}")
    return output_dir
