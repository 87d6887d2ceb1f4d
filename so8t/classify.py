"""``so8t train --task classify``: trains the safety judge, a sequence classifier with SO(8) gates.

With no ``--model`` it trains the embedded default from scratch (the demo Phi-3 with a 3-class head,
every weight trainable) on the bundled ``data/safety.jsonl``, offline, in seconds on a CPU. With
``--model`` it adds LoRA to that model's sequence-classification head model (the head is trained in
full). The SO8T monitor (``--monitor-*`` options) records the class-logit statistics and the gates
as for ``--task generate``.
The output directory is the judge ``so8t serve --safety-model`` reads (see so8t.judge).

Held-out rows (``--eval-data``, ``--eval-fraction``; for the bundled data by default its
``data/safety_heldout.jsonl``, built from tasks in no training row) give the accuracy on prompts the judge
never trained on, and calibrate its confidence: the temperature fitted on them (so8t.calibration) is
written to ``judge_calibration.json`` next to the judge, which applies it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .adapter import SO8T_ADAPTER_DIR, save_so8t_adapter
from .calibration import Calibration, fit_temperature, write_calibration
from .dataset import iter_jsonl_objects
from .errors import SO8TError
from .judge import LABELS, encode_for_judge, label_maps
from .placement import BANK_ATTRIBUTE, attach_so8t, find_decoder_layout, resolve_layer_indices
from .training.heldout import split_held_out
from .training.loading import load_model_and_tokenizer
from .training.options import TrainOptions
from .training.outputs import TRAINER_STATE_FILE
from .training.runner import run_training
from .training.trainer import build_trainer


def bundled_safety_path() -> Path:
    return Path(str(resources.files("so8t") / "data" / "safety.jsonl"))


def bundled_heldout_path() -> Path:
    return Path(str(resources.files("so8t") / "data" / "safety_heldout.jsonl"))


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int  # index into LABELS


def read_labelled_jsonl(path: str | Path) -> list[LabelledText]:
    """``{"text": ..., "label": "ALLOW" | "ESCALATE" | "DENY"}`` rows; problems name the file and line."""
    _, label2id = label_maps()
    examples = []
    for where, row in iter_jsonl_objects(path):
        if not (isinstance(row.get("text"), str) and "label" in row):
            raise SO8TError(f"{where}: expected an object with a string `text` and a `label`")
        if row["label"] not in label2id:
            raise SO8TError(f"{where}: label {row['label']!r} is not one of {', '.join(LABELS)}")
        examples.append(LabelledText(row["text"], label2id[row["label"]]))
    return examples


class ClassificationDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, examples: list[LabelledText], max_length: int):
        self.items = [(encode_for_judge(tokenizer, example.text, max_length)[0], example.label) for example in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.items[index]


class ClassificationCollator:
    """Right-pads; the classifier pools the last token that is not padding."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_options(options: TrainOptions) -> None:
    unsupported = {"--load-in-4bit": options.load_in_4bit, "--bf16": options.bf16,
                   "--gradient-checkpointing": options.gradient_checkpointing}
    for flag, given in unsupported.items():
        if given:
            raise SO8TError(f"{flag} is for --task generate; --task classify trains in fp32")
    options.validate()


def build_classifier(options: TrainOptions):
    """The model (LoRA-wrapped when ``--model`` is given) and its tokenizer; no gates yet."""
    model, tokenizer = load_model_and_tokenizer(options, labels=LABELS)
    if options.model is None:  # the embedded default is trained from scratch, every weight
        return model, tokenizer
    from .training.lora import add_lora

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


def accuracy(model, dataset: ClassificationDataset, collator: ClassificationCollator, batch_size: int) -> float:
    logits, labels = class_logits(model, dataset, collator, batch_size)
    return (logits.argmax(dim=-1) == labels).double().mean().item()


def held_out_summary(calibration: Calibration | None) -> str:
    if calibration is None:
        return ("no held-out rows (--eval-data or --eval-fraction): accuracy on unseen prompts unknown, "
                "confidence not calibrated (temperature 1)")
    return (f"held-out accuracy {calibration.held_out_accuracy:.0%} on {calibration.held_out_rows} rows never trained "
            f"on; confidence calibrated on them: temperature {calibration.temperature:.2f}, mean NLL "
            f"{calibration.nll_before:.3f} → {calibration.nll_after:.3f}, calibration error "
            f"{calibration.ece_before:.1%} → {calibration.ece_after:.1%}")


def _save_judge(model, tokenizer, handle, trainer, directory: Path) -> None:
    if handle is not None:
        save_so8t_adapter(handle, directory / SO8T_ADAPTER_DIR)
    if isinstance(model, PreTrainedModel):  # every weight trained: the whole model, except the gates
        weights = {name: tensor for name, tensor in model.state_dict().items() if BANK_ATTRIBUTE not in name}
        model.save_pretrained(directory, state_dict=weights)
    else:  # LoRA: its adapter only, which has no gates in it
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    trainer.state.save_to_json(str(directory / TRAINER_STATE_FILE))


def train_classifier(options: TrainOptions) -> Path:
    """Builds, trains and publishes the judge into ``options.output_dir``; returns that directory."""
    check_options(options)
    if options.data is None and not options.evaluates:  # the bundled data comes with its held-out rows
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

    def write_judge(directory: Path) -> None:
        _save_judge(model, tokenizer, handle, trainer, directory)
        if eval_dataset is not None:  # fitted on the trained judge, published with it
            calibrations.append(fit_temperature(*class_logits(model, eval_dataset, collator, options.batch_size)))
            write_calibration(calibrations[-1], directory)

    run_training(trainer, options, handle, write_judge)
    elapsed = time.perf_counter() - started
    train_accuracy = accuracy(model, dataset, collator, options.batch_size)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"\nso8t train --task classify: {trainer.state.global_step} steps in {elapsed:.1f} s, "
          f"loss {losses[0]:.3f} → {losses[-1]:.3f}, accuracy on the training data {train_accuracy:.0%}")
    print(held_out_summary(calibrations[-1] if calibrations else None))
    print(f"safety judge in {output_dir} (labels {', '.join(LABELS)}); serve it with so8t serve --safety-model {output_dir}")
    return output_dir
