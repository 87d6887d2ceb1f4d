"""Splits a decoded completion into its thinking (between ``<think>`` and ``</think>``) and its answer.

Parses the decoded text, never the tokens, so a tag that the tokenizer split over several tokens (or
that a byte-level model spelled out byte by byte) is found all the same. Which case applied is part of
the result, so a client can tell a clean ``<think>…</think>answer`` from a completion that ran out of
tokens mid-thought.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..data.dataset import THINK_CLOSE, THINK_OPEN

NONE = "none"  # no tag at all: everything is the answer
CLOSED = "closed"  # one <think>…</think> block
UNCLOSED = "unclosed"  # one <think> block that never closes: it runs to the end of the text
UNOPENED = "unopened"  # a </think> with no <think> before it: the text before it is the thinking
MULTIPLE = "multiple"  # more than one block (the last one may be unclosed)
CASES = (NONE, CLOSED, UNCLOSED, UNOPENED, MULTIPLE)
BLOCK_SEPARATOR = "\n"


@dataclass(frozen=True)
class ParsedCompletion:
    thinking: str  # the blocks' text exactly as generated, joined by BLOCK_SEPARATOR
    answer: str  # everything outside the blocks, stripped of surrounding whitespace
    case: str  # one of CASES

    @property
    def thinking_sha256(self) -> str:
        return sha256_text(self.thinking)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_thinking(text: str) -> ParsedCompletion:
    """Thinking blocks and answer of ``text``.

    Scanning left to right: ``<think>`` opens a block that the next ``</think>`` closes (a ``<think>``
    inside an open block is part of its text); a ``</think>`` before any ``<think>`` closes an implicit
    block that started at the beginning (chat templates that put ``<think>`` in the prompt produce
    this); a ``</think>`` outside a block after that is dropped from the answer.
    """
    blocks: list[str] = []
    answer_parts: list[str] = []
    unclosed = unopened = False
    position = 0
    first_close, first_open = text.find(THINK_CLOSE), text.find(THINK_OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        blocks.append(text[:first_close])
        unopened = True
        position = first_close + len(THINK_CLOSE)
    while position < len(text):
        start = text.find(THINK_OPEN, position)
        if start == -1:
            answer_parts.append(text[position:].replace(THINK_CLOSE, ""))
            break
        answer_parts.append(text[position:start].replace(THINK_CLOSE, ""))
        body_start = start + len(THINK_OPEN)
        end = text.find(THINK_CLOSE, body_start)
        if end == -1:
            blocks.append(text[body_start:])
            unclosed = True
            break
        blocks.append(text[body_start:end])
        position = end + len(THINK_CLOSE)
    return ParsedCompletion(
        thinking=BLOCK_SEPARATOR.join(blocks),
        answer="".join(answer_parts).strip(),
        case=_case(len(blocks), unclosed, unopened),
    )


def _case(num_blocks: int, unclosed: bool, unopened: bool) -> str:
    if num_blocks == 0:
        return NONE
    if num_blocks > 1:
        return MULTIPLE
    if unopened:
        return UNOPENED
    return UNCLOSED if unclosed else CLOSED
