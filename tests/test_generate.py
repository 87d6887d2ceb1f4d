"""``so8t generate`` on the embedded default (offline): the streamed answer is the model's greedy completion,
the chat reads stdin, bad input is one line and status 2; the thinking filter with tags split anywhere.
The real model's answers are checked in test_real_model.py."""

import os
import subprocess
import sys

import pytest
from cli_helpers import generate as main

from so8t.commands.generate import ThinkingFilter
from so8t.serve.generation import load_generator

TEXT = "Sure.<think>add the ones</think>It is 5."


def filtered(chunks: list[str], show_thinking: bool) -> tuple[str, ThinkingFilter]:
    written = []
    thinking = ThinkingFilter(written.append, show_thinking)
    for chunk in chunks:
        thinking.feed(chunk)
    thinking.finish()
    return "".join(written), thinking


@pytest.mark.parametrize("show_thinking", [False, True])
def test_the_thinking_filter_finds_tags_split_between_any_chunks(show_thinking):
    expected = TEXT if show_thinking else "Sure.It is 5."
    for first in range(len(TEXT) + 1):
        for second in range(first, len(TEXT) + 1):
            chunks = [TEXT[:first], TEXT[first:second], TEXT[second:]]
            text, thinking = filtered(chunks, show_thinking)
            assert text == expected, chunks
            assert thinking.answer == "Sure.It is 5."
            assert thinking.hidden_chars == (0 if show_thinking else len("add the ones"))


def test_the_thinking_filter_passes_a_lone_angle_bracket_and_an_unclosed_thinking():
    assert filtered(["a <", "b"], False)[0] == "a <b"
    assert filtered(["x<thi", "nk>never closed"], False)[0] == "x"
    assert filtered(["x<thi", "nk>never closed"], True)[0] == "x<think>never closed"


def run_generate(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "so8t", "generate", *arguments], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_chat_streams_each_answer_from_stdin_as_the_model_generates_it():
    expected = load_generator().generate("What is 2 + 3?", max_new_tokens=12, temperature=0.0, top_p=1.0).text
    result = run_generate("--max-new-tokens", "12", "--show-thinking",
                          stdin="What is 2 + 3?\n\nWhat is 7 * 5?\n/exit\nnot read\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(expected + "\n")  # the first turn: no history yet, the same prompt
    # Two answers (the blank line is skipped, nothing after /exit is read), each with its speed.
    assert result.stderr.count("[12 tokens in ") == 2 and result.stderr.count("tokens/s]") == 2, result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be at least 1"),
    (["--top-p", "0", "hi"], "--top-p must be in (0, 1]"),
    (["   "], "the prompt is empty"),
    (["--adapter", "/nonexistent/run", "hi"], "--adapter /nonexistent/run: no such directory"),
    (["--model", "/nonexistent/model.gguf", "hi"], "--model /nonexistent/model.gguf: no such GGUF file"),
])
def test_bad_input_is_one_line_and_status_2(arguments, message, capsys):
    assert main(arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("so8t generate: error: ") and message in err[0], err
