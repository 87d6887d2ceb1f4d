"""The judge's data: labelled JSONL rows (the bundled safety.jsonl and its held-out rows, or a user's
file), tokenized as the judge reads them, and batched for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..data.dataset import iter_jsonl_objects
from ..errors import SO8TError
from .judge import LABELS, encode_for_judge, label_maps


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
