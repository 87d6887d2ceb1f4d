"""Training data: JSONL rows → (prompt, completion) text pairs → token ids with the prompt masked out.

Row layouts (one per file, decided by the first row):
- ``{"text": ...}``: plain text, every token is trained on.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last message (the assistant's) is the
  completion; the ones before it are the prompt, rendered with the tokenizer's chat template if it has one.
- ``{"prompt": ..., "thinking": ..., "answer": ...}``: completion ``<think>thinking</think>answer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import SO8TError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LAYOUTS = {
    "text": ("text",),
    "messages": ("messages",),
    "thinking": ("prompt", "thinking", "answer"),
}
IGNORE_INDEX = -100  # label value the causal-LM loss skips


def bundled_dataset_path() -> Path:
    return Path(str(resources.files("so8t") / "data" / "thinking.jsonl"))


@dataclass
class TextPair:
    prompt: str | list[dict]  # text, or the chat messages before the completion
    completion: str


def _layout_of(row: dict, where: str) -> str:
    for name, keys in LAYOUTS.items():
        if all(key in row for key in keys):
            return name
    expected = "; ".join(", ".join(keys) for keys in LAYOUTS.values())
    raise SO8TError(f"{where}: unknown field layout {sorted(row)}; expected the fields {{{expected}}}")


def _pair_from_row(row: dict, layout: str, where: str) -> TextPair:
    if layout == "text":
        _require_strings(row, ("text",), where)
        return TextPair(prompt="", completion=row["text"])
    if layout == "thinking":
        _require_strings(row, LAYOUTS["thinking"], where)
        completion = f"{THINK_OPEN}{row['thinking']}{THINK_CLOSE}{row['answer']}"
        return TextPair(prompt=[{"role": "user", "content": row["prompt"]}], completion=completion)
    messages = row["messages"]
    if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
        raise SO8TError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    if messages[-1]["role"] != "assistant":
        raise SO8TError(f"{where}: the last message must be the assistant's (the completion to train on)")
    return TextPair(prompt=messages[:-1], completion=messages[-1]["content"])


def _is_message(message) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def _require_strings(row: dict, keys, where: str) -> None:
    for key in keys:
        if not isinstance(row[key], str):
            raise SO8TError(f"{where}: field {key!r} must be a string, not {type(row[key]).__name__}")


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for each non-blank line; a missing file, malformed JSON, a row that is not
    an object or a file without rows is an SO8TError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise SO8TError(f"data file {path} not found")
    rows = 0
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                # Without its newline: an error at the end of a truncated row is at its last column
                # plus one, not at column 1 of a line after it.
                row = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as error:
                raise SO8TError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise SO8TError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows += 1
            yield where, row
    if not rows:
        raise SO8TError(f"data file {path} has no rows")


def read_jsonl(path: str | Path) -> list[TextPair]:
    """All rows of a JSONL file as text pairs; any problem is an SO8TError naming the file and line."""
    pairs, layout = [], None
    for where, row in iter_jsonl_objects(path):
        row_layout = _layout_of(row, where)
        if layout is None:
            layout = row_layout
        elif row_layout != layout:
            raise SO8TError(f"{where}: row has the {row_layout!r} layout but earlier rows have {layout!r}")
        pairs.append(_pair_from_row(row, layout, where))
    return pairs


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    turns = "".join(f"{message['role'].capitalize()}: {message['content']}\n" for message in prompt)
    return f"{turns}Assistant: "


def tokenize_pair(tokenizer, pair: TextPair, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (the prompt's positions set to IGNORE_INDEX), ending with EOS, truncated."""
    prompt_ids = tokenizer(render_prompt(tokenizer, pair.prompt), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, pairs: list[TextPair], max_length: int):
        self.examples = [tokenize_pair(tokenizer, pair, max_length) for pair in pairs]
        if not any(label != IGNORE_INDEX for example in self.examples for label in example["labels"]):
            raise SO8TError(f"every completion was truncated away: raise --max-length (now {max_length})")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class PaddingCollator:
    """Right-pads a batch to its longest example; padding is masked from attention and from the loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = torch.tensor(example["input_ids"])
            labels[row, :size] = torch.tensor(example["labels"])
            attention_mask[row, :size] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
