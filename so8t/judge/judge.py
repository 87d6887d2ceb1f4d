"""The safety judge: a sequence classifier with SO(8) gates that labels a prompt ALLOW, ESCALATE or DENY.

It fails closed: a verdict below the confidence threshold, a prompt longer than the judge can read
(it would judge a truncated prompt), or output that is not a probability distribution (a NaN or
infinite logit, e.g. from weights that diverged in training) is ESCALATE whatever the model's top
label. The label vocabulary below is the one everywhere: the model config's id2label, the API, the
audit database. Its confidence is the softmax of the logits divided by the temperature fitted on
held-out rows (so8t.judge.calibration).

A judge directory is what ``so8t train --task classify`` writes: a full model (the embedded default,
trained from scratch) or a LoRA adapter over a base named in its adapter_config.json, the SO8T gates in
``so8t/``, and the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import SO8TError
from ..models.json_file import read_json_object
from .calibration import check_temperature, read_temperature

ALLOW, ESCALATE, DENY = "ALLOW", "ESCALATE", "DENY"
LABELS = (ALLOW, ESCALATE, DENY)  # class index = position
DEFAULT_THRESHOLD = 0.6
PEFT_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def label_maps() -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(LABELS)), {label: index for index, label in enumerate(LABELS)}


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise SO8TError(f"safety threshold {threshold}: must be in [0, 1]")
    return threshold


@dataclass(frozen=True)
class Verdict:
    label: str  # what the server acts on
    confidence: float | None  # the model's probability of its top label (None: the output was unusable)
    predicted: str | None  # the model's top label (differs from `label` when the judge failed closed)
    reason: str  # "model", "low_confidence", "too_long" or "invalid_output"


# Softmax output sums to 1 within float32 rounding over 3 classes; anything further off is not a distribution.
PROBABILITY_SUM_TOLERANCE = 1e-3


def usable(probabilities: Sequence[float]) -> bool:
    """Finite, each in [0, 1], summing to 1: what a judge's output must be before anything is read from it."""
    values = [float(value) for value in probabilities]
    return (all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in values)
            and abs(sum(values) - 1.0) <= PROBABILITY_SUM_TOLERANCE)


def decide(probabilities: Sequence[float], threshold: float, truncated: bool = False) -> Verdict:
    """The verdict from class probabilities (in LABELS order)."""
    if len(probabilities) != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} class probabilities, got {len(probabilities)}")
    if not usable(probabilities):  # max() over NaN would pick index 0, ALLOW, and `NaN < threshold` is false
        return Verdict(ESCALATE, None, None, "invalid_output")
    top = max(range(len(LABELS)), key=lambda index: probabilities[index])
    predicted, confidence = LABELS[top], float(probabilities[top])
    if truncated:
        return Verdict(ESCALATE, confidence, predicted, "too_long")
    if confidence < threshold:
        return Verdict(ESCALATE, confidence, predicted, "low_confidence")
    return Verdict(predicted, confidence, predicted, "model")


def encode_for_judge(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids ending with EOS (the classifier reads the last token's state) and whether the text had
    to be cut to fit ``max_length``. Training and judging encode the same way."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    if len(ids) <= max_length:
        return ids, False
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids[:max_length - len(tail)] + tail, True


def readable_length(model, tokenizer) -> int:
    """The longest input the judge reads whole: the model's positions, or the tokenizer's limit."""
    positions = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(positions, tokenizer.model_max_length))


class SafetyJudge:
    """Judges one text at a time; not thread-safe (the server calls it from its one model thread)."""

    def __init__(self, model, tokenizer, threshold: float = DEFAULT_THRESHOLD, temperature: float = 1.0):
        check_label_vocabulary(model.config)
        self.temperature = check_temperature(temperature)  # divides the logits (so8t.judge.calibration)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.threshold = check_threshold(threshold)
        self.max_length = readable_length(model, tokenizer)

    def judge(self, text: str) -> Verdict:
        import torch

        ids, truncated = encode_for_judge(self.tokenizer, text, self.max_length)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0]
            probabilities = torch.softmax(logits.float() / self.temperature, dim=-1).tolist()
        return decide(probabilities, self.threshold, truncated)

    @classmethod
    def load(cls, directory: str | Path, threshold: float = DEFAULT_THRESHOLD) -> SafetyJudge:
        temperature = read_temperature(directory)  # a bad calibration file fails before the model loads
        model, tokenizer = load_classifier(directory)
        return cls(model, tokenizer, threshold, temperature)


def check_label_vocabulary(config) -> None:
    labels = tuple(config.id2label[index] for index in sorted(config.id2label))
    if labels != LABELS:
        raise SO8TError(f"the safety model's labels are {list(labels)}; a so8t judge has {list(LABELS)} in that order")


def check_judge_dir(directory: str | Path) -> Path:
    """Refuses, from its files alone (no model loading, no hub), a directory that is not a so8t judge:
    a ``so8t train --task classify`` output has a tokenizer and either a config.json whose labels are
    LABELS or a sequence-classification LoRA adapter_config.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SO8TError(f"{directory}: no such directory")
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
    config, adapter_config = directory / MODEL_CONFIG_FILE, directory / PEFT_CONFIG_FILE
    if config.is_file():
        labels = read_json_object(config).get("id2label") or {}
        if [labels.get(str(index)) for index in range(len(labels))] != list(LABELS):
            raise SO8TError(f"{directory} is not a so8t judge: its {MODEL_CONFIG_FILE} labels are "
                            f"{list(labels.values())}, a judge has {list(LABELS)}")
    elif adapter_config.is_file():
        task = read_json_object(adapter_config).get("task_type")
        if task != "SEQ_CLS":
            raise SO8TError(f"{directory} is not a so8t judge: its {PEFT_CONFIG_FILE} is a {task} adapter "
                            "(a so8t train --task generate output?), a judge's is SEQ_CLS")
    else:
        missing.insert(0, f"{MODEL_CONFIG_FILE} or {PEFT_CONFIG_FILE}")
    if missing:
        raise SO8TError(f"{directory} is not a so8t judge (so8t train --task classify output): missing "
                        + ", ".join(missing))
    return directory


def load_classifier(directory: str | Path, base: str | None = None):
    """Model (gates attached, eval mode) and tokenizer from a ``so8t train --task classify`` output; a LoRA
    judge's base from ``base`` (a hub id or directory) when given, else the one its adapter names."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..gates.adapter import SO8T_ADAPTER_DIR, load_so8t_adapter

    directory = check_judge_dir(directory)
    id2label, label2id = label_maps()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if (directory / PEFT_CONFIG_FILE).is_file():
        from peft import PeftConfig, PeftModel

        base_name = base or PeftConfig.from_pretrained(directory).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(
            base_name, num_labels=len(LABELS), id2label=id2label, label2id=label2id)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(directory)
    if (directory / SO8T_ADAPTER_DIR).is_dir():
        load_so8t_adapter(model, directory / SO8T_ADAPTER_DIR)
    if torch.cuda.is_available():  # next to the generation model (so8t.models.inference)
        model = model.to("cuda")
    return model.eval(), tokenizer
