"""The thinking parser: every case it names, tags split over tokens, and the hash of what it returns."""

import hashlib

import pytest

from so8t.models.demo import build_demo_tokenizer
from so8t.serve.thinking import CLOSED, MULTIPLE, NONE, UNCLOSED, UNOPENED, parse_thinking, sha256_text


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
        ("the prompt opened it</think>answer", "the prompt opened it", "answer", UNOPENED),
        ("a</think>b<think>c</think>d", "a\nc", "bd", MULTIPLE),
        ("<think>outer <think>inner</think> tail", "outer <think>inner", "tail", CLOSED),
        ("<think></think>empty thought", "", "empty thought", CLOSED),
        ("<think>x</think>stray </think> close", "x", "stray  close", CLOSED),
    ],
)
def test_cases(text, thinking, answer, case):
    parsed = parse_thinking(text)
    assert (parsed.thinking, parsed.answer, parsed.case) == (thinking, answer, case)


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
