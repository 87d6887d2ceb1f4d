"""Splits a completion into its thinking (between ``<think>`` and ``</think>``) and its answer: the one
parser of ``so8t serve`` (/think, /v1, plain and streamed) and ``so8t generate``.

``ThinkingStream`` reads the completion in pieces as it is generated and says at once what each piece
is; ``parse_thinking`` is the same machine fed the whole text. So a streamed answer is, piece by piece, the
answer of the final parse. It reads the decoded text, never the tokens, so a tag that the tokenizer split
over several tokens (or that a byte-level model spelled out byte by byte) is found all the same; a tail
that may still become a tag is held back until the next piece decides (``partial_tail``, which the
engines use for stop strings too).

Left to right: ``<think>`` opens a block that the next ``</think>`` closes (a ``<think>`` inside an
open block is part of its text); a ``</think>`` outside a block is dropped. A chat template that ends
the prompt with ``<think>`` (``prompt_opens_thinking``) makes the completion start inside a block: the
text before its first ``</think>`` is thinking. Which case applied is part of the result, so a client can
tell a clean ``<think>…</think>answer`` from a completion that ran out of tokens mid-thought.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..data.dataset import THINK_CLOSE, THINK_OPEN

NONE = "none"  # no block at all: everything is the answer
CLOSED = "closed"  # one <think>…</think> block
UNCLOSED = "unclosed"  # one block that never closes: it runs to the end of the text
UNOPENED = "unopened"  # the prompt opened the block, the completion closed it: the text before </think>
MULTIPLE = "multiple"  # more than one block (the last one may be unclosed)
CASES = (NONE, CLOSED, UNCLOSED, UNOPENED, MULTIPLE)
BLOCK_SEPARATOR = "\n"
THINKING, ANSWER = "thinking", "answer"  # what a piece of the completion is


@dataclass(frozen=True)
class ParsedCompletion:
    thinking: str  # the blocks' text exactly as generated, joined by BLOCK_SEPARATOR
    answer: str  # everything outside the blocks, stripped of surrounding whitespace
    case: str  # one of CASES

    @property
    def thinking_sha256(self) -> str:
        return sha256_text(self.thinking)


@dataclass(frozen=True)
class Piece:
    kind: str  # THINKING or ANSWER
    text: str
    tag: str = ""  # the tag that ended the piece (THINK_OPEN, THINK_CLOSE), if one did: never in ``text``


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def partial_tail(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is the start of one of ``needles`` (not all of it):
    what to hold back until more text shows whether the needle follows ("Hello world E" for "END": 1)."""
    return max((length for needle in needles for length in range(1, len(needle))
                if text.endswith(needle[:length])), default=0)


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the completion inside a thinking block (its template ends with
    ``<think>``, as reasoning models' templates do)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ThinkingStream:
    """The completion in pieces, in order: ``feed`` each new piece of text as it is generated, then
    ``finish``; each returns what is decided so far. ``parsed()`` is the result once finished."""

    def __init__(self, opened: bool = False):
        self.inside = opened
        self.pending = ""
        self.blocks: list[str] = [""] if opened else []
        self.answer_parts: list[str] = []
        self.unopened = opened
        self.finished = False

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        pieces = []
        while True:
            tags = (THINK_CLOSE,) if self.inside else (THINK_OPEN, THINK_CLOSE)
            found = [(at, tag) for tag in tags if (at := self.pending.find(tag)) != -1]
            if not found:
                break
            at, tag = min(found)
            pieces.append(self._take(self.pending[:at], tag))
            self.pending = self.pending[at + len(tag):]
            if tag == THINK_OPEN:
                self.blocks.append("")
                self.inside = True
            elif self.inside:
                self.inside = False
        held = partial_tail(self.pending, tags)
        if len(self.pending) > held:
            pieces.append(self._take(self.pending[:len(self.pending) - held]))
            self.pending = self.pending[len(self.pending) - held:]
        return [piece for piece in pieces if piece.text or piece.tag]

    def finish(self) -> list[Piece]:
        pieces = [self._take(self.pending)] if self.pending else []
        self.pending, self.finished = "", True
        return pieces

    def _take(self, text: str, tag: str = "") -> Piece:
        if self.inside:
            self.blocks[-1] += text
            return Piece(THINKING, text, tag)
        self.answer_parts.append(text)
        return Piece(ANSWER, text, tag)  # a stray </think> ends the piece but is no part of the answer

    def parsed(self) -> ParsedCompletion:
        return ParsedCompletion(thinking=BLOCK_SEPARATOR.join(self.blocks), answer="".join(self.answer_parts).strip(),
                                case=self._case())

    def _case(self) -> str:
        if not self.blocks:
            return NONE
        if len(self.blocks) > 1:
            return MULTIPLE
        if self.inside:
            return UNCLOSED
        return UNOPENED if self.unopened else CLOSED


def parse_thinking(text: str, opened: bool = False) -> ParsedCompletion:
    """Thinking blocks and answer of a whole completion (``opened``: the prompt opened a block)."""
    stream = ThinkingStream(opened)
    stream.feed(text)
    stream.finish()
    return stream.parsed()


class AnswerDeltas:
    """The answer of a streamed completion as deltas that add up to ``parsed().answer``: surrounding
    whitespace is held back until text follows it (the final answer is stripped)."""

    def __init__(self):
        self.started = False
        self.held = ""

    def add(self, pieces: list[Piece]) -> str:
        text = self.held + "".join(piece.text for piece in pieces if piece.kind == ANSWER)
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        self.held = text[len(body):]
        return body
