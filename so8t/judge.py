"""The safety judge: a sequence classifier with SO(8) gates that labels a prompt ALLOW, ESCALATE or DENY.

It fails closed: a verdict below the confidence threshold, or a prompt longer than the judge can read
(it would judge a truncated prompt), is ESCALATE whatever the model's top label. The label vocabulary
below is the one everywhere: the model config's id2label, the API, the audit database. Its confidence is
the softmax of the logits divided by the temperature fitted on held-out rows (so8t.calibration).

A judge directory is what ``so8t train --task classify`` writes: a full model (the embedded default,
trained from scratch) or a LoRA adapter over a base named in its adapter_config.json, the SO8T gates in
``so8t/``, and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .calibration import check_temperature, read_temperature
from .errors import SO8TError

ALLOW, ESCALATE, DENY = "ALLOW", "ESCALATE", "DENY"
LABELS = (ALLOW, ESCALATE, DENY)  # class index = position
DEFAULT_THRESHOLD = 0.6
PEFT_CONFIG_FILE = "adapter_config.json"


def label_maps() -> tuple[dict[int, str], dict[str, int]]:
    return dict(enumerate(LABELS)), {label: index for index, label in enumerate(LABELS)}


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise SO8TError(f"safety threshold {threshold}: must be in [0, 1]")
    return threshold


@dataclass(frozen=True)
class Verdict:
    label: str  # what the server acts on
    confidence: float  # the model's probability of its top label
    predicted: str  # the model's top label (differs from `label` when the judge failed closed)
    reason: str  # "model", "low_confidence" or "too_long"


def decide(probabilities: Sequence[float], threshold: float, truncated: bool = False) -> Verdict:
    """The verdict from class probabilities (in LABELS order)."""
    if len(probabilities) != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} class probabilities, got {len(probabilities)}")
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
        self.temperature = check_temperature(temperature)  # divides the logits (so8t.calibration)
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


def load_classifier(directory: str | Path):
    """Model (gates attached, eval mode) and tokenizer from a ``so8t train --task classify`` output."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .adapter import SO8T_ADAPTER_DIR, load_so8t_adapter

    directory = Path(directory)
    if not directory.is_dir():
        raise SO8TError(f"safety model {directory}: no such directory")
    id2label, label2id = label_maps()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if (directory / PEFT_CONFIG_FILE).is_file():
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(directory).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(
            base_name, num_labels=len(LABELS), id2label=id2label, label2id=label2id)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, directory).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(directory)
    if (directory / SO8T_ADAPTER_DIR).is_dir():
        load_so8t_adapter(model, directory / SO8T_ADAPTER_DIR)
    if torch.cuda.is_available():  # next to the generation model (so8t.serve.loading)
        model = model.to("cuda")
    return model.eval(), tokenizer
