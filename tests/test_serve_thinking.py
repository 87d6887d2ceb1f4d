"""The thinking parser: every case it names, tags split over tokens or over streamed pieces anywhere (the
same result as the whole text), the answer streamed as it grows, and the hash of what it returns."""

import hashlib

import pytest

from so8t.models.demo import build_demo_tokenizer
from so8t.serve.thinking import (
    ANSWER,
    CLOSED,
    MULTIPLE,
    NONE,
    THINKING,
    UNCLOSED,
    UNOPENED,
    AnswerDeltas,
    ThinkingStream,
    parse_thinking,
    prompt_opens_thinking,
    sha256_text,
)


@pytest.mark.parametrize(
    ("text", "thinking", "answer", "case"),
    [
        ("<think>2 + 2 is 4.</think> 4", "2 + 2 is 4.", "4", CLOSED),
        ("Sure. <think>a</think>b", "a", "Sure. b", CLOSED),
        ("just an answer", "", "just an answer", NONE),
        ("", "", "", NONE),
        ("<think>ran out of tokens while thin", "ran out of tokens while thin", "", UNCLOSED),
        ("intro <think>cut</th", "cut</th", "intro", UNCLOSED),
        ("<think>one</think>mid<think>two</think>end", "one\ntwo", "midend", MULTIPLE),
        ("<think>one</think>x<think>two, unclosed", "one\ntwo, unclosed", "x", MULTIPLE),
        ("a stray </think>close is dropped", "", "a stray close is dropped", NONE),
        ("a</think>b<think>c</think>d", "c", "abd", CLOSED),
        ("<think>outer <think>inner</think> tail", "outer <think>inner", "tail", CLOSED),
        ("<think></think>empty thought", "", "empty thought", CLOSED),
        ("<think>x</think>stray </think> close", "x", "stray  close", CLOSED),
    ],
)
def test_cases(text, thinking, answer, case):
    parsed = parse_thinking(text)
    assert (parsed.thinking, parsed.answer, parsed.case) == (thinking, answer, case)


@pytest.mark.parametrize(
    ("text", "thinking", "answer", "case"),
    [
        ("the prompt opened it</think>answer", "the prompt opened it", "answer", UNOPENED),
        ("a</think>b<think>c</think>d", "a\nc", "bd", MULTIPLE),
        ("still thinking when the tokens ran out", "still thinking when the tokens ran out", "", UNCLOSED),
    ],
)
def test_cases_after_a_prompt_that_opened_the_block(text, thinking, answer, case):
    parsed = parse_thinking(text, opened=True)
    assert (parsed.thinking, parsed.answer, parsed.case) == (thinking, answer, case)


def test_a_prompt_opens_the_block_when_its_template_ends_with_the_tag():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>user\nwhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n")


TEXTS = ["Sure.<think>add the ones</think>It is 5.", "  <think>a</think>\n b </think>c<thin", "no tags at all <",
         "<think>x</think>y<think>z"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("opened", [False, True])
def test_pieces_split_anywhere_parse_as_the_whole_text(text, opened):
    whole = parse_thinking(text, opened)
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            stream, answer, pieces, sent = ThinkingStream(opened), AnswerDeltas(), [], ""
            for chunk in (text[:first], text[first:second], text[second:]):
                new = stream.feed(chunk)
                pieces, sent = pieces + new, sent + answer.add(new)
            new = stream.finish()
            pieces, sent = pieces + new, sent + answer.add(new)
            assert stream.parsed() == whole, (text[:first], text[first:second])
            assert "".join(piece.text + piece.tag for piece in pieces) == text  # nothing lost, nothing added
            assert sent == whole.answer


def test_the_answer_streams_from_the_first_pieces_unless_a_block_opens_and_adds_up():
    def deltas(chunks: list[str], opened: bool = False) -> list[str]:
        stream, answer, sent = ThinkingStream(opened), AnswerDeltas(), []
        for chunk in chunks:
            sent.append(answer.add(stream.feed(chunk)))
        sent.append(answer.add(stream.finish()))
        assert "".join(sent) == stream.parsed().answer
        return sent

    # A model that does not think: its first characters cannot begin <think>, so they go out at once.
    assert deltas(["The", " capital", " is", " Paris", "."]) == ["The", " capital", " is", " Paris", ".", ""]
    # One that thinks: nothing until the block closes, then the answer as it grows (surrounding space held).
    assert deltas(["<th", "ink>16 + 25", "</think>", "\n It", " is 41", ". "]) == ["", "", "", "It", " is 41", ".", ""]
    # A tail that may be a tag waits for the next piece.
    assert deltas(["Sure <", "b>"]) == ["Sure", " <b>", ""]
    assert deltas(["thought</think>", "answer"], opened=True) == ["", "answer", ""]


def test_pieces_say_what_they_are():
    stream = ThinkingStream()
    pieces = stream.feed("a<think>b</think>c") + stream.finish()
    assert [(piece.kind, piece.text, piece.tag) for piece in pieces] == [
        (ANSWER, "a", "<think>"), (THINKING, "b", "</think>"), (ANSWER, "c", "")]


def test_thinking_keeps_its_whitespace_and_the_hash_is_of_its_utf8_bytes():
    parsed = parse_thinking("<think>\n  größer als 3 → ja 🙂\n</think>\nja")
    assert parsed.thinking == "\n  größer als 3 → ja 🙂\n"
    assert parsed.thinking_sha256 == hashlib.sha256(parsed.thinking.encode("utf-8")).hexdigest()
    assert parse_thinking("no tags").thinking_sha256 == hashlib.sha256(b"").hexdigest() == sha256_text("")


def test_tags_spelled_byte_by_byte_parse_like_the_special_tokens():
    tokenizer = build_demo_tokenizer()
    text = "<think>step one</think>42"
    as_special_tokens = tokenizer(text)["input_ids"]
    as_bytes = [tokenizer.convert_tokens_to_ids(symbol) for symbol in tokenizer.backend_tokenizer.pre_tokenizer
                .pre_tokenize_str(text)[0][0]]
    assert len(as_special_tokens) < len(as_bytes)  # the tags are one token each, or one per byte
    for ids in (as_special_tokens, as_bytes):
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        parsed = parse_thinking(decoded)
        assert (parsed.thinking, parsed.answer, parsed.case) == ("step one", "42", CLOSED)
