"""``so8t generate`` on the embedded default (offline): the streamed answer is the server engine's greedy
completion, the chat reads stdin, bad input is one line and status 2. The thinking parser it shares with the
server is tested in test_serve_thinking.py; the real model's answers in test_real_model.py."""

import os
import subprocess
import sys

import pytest
from cli_helpers import generate as main
from serve_helpers import complete

from so8t.serve.engines.hf import HFEngine


def run_generate(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "so8t", "generate", "--model", "demo", *arguments], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_chat_streams_each_answer_from_stdin_as_the_model_generates_it():
    engine = HFEngine.load()
    expected = complete(engine, "What is 2 + 3?", 12).text
    engine.shutdown()
    result = run_generate("--max-new-tokens", "12", "--show-thinking",
                          stdin="What is 2 + 3?\n\nWhat is 7 * 5?\n/exit\nnot read\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(expected + "\n")  # the first turn: no history yet, the same prompt
    # Two answers (the blank line is skipped, nothing after /exit is read), each with its speed.
    assert result.stderr.count("[12 tokens in ") == 2 and result.stderr.count("tokens/s]") == 2, result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be in [1, 2048], got 0"),
    (["--max-new-tokens", "2049", "hi"], "--max-new-tokens must be in [1, 2048], got 2049"),
    (["--temperature", "2.5", "hi"], "--temperature must be in [0, 2], got 2.5"),
    (["--top-p", "0", "hi"], "--top-p must be in (0, 1]"),
    (["   "], "the prompt is empty"),
    (["--adapter", "/nonexistent/run", "hi"], "--adapter /nonexistent/run: no such directory"),
    (["--model", "/nonexistent/model.gguf", "hi"], "--model /nonexistent/model.gguf: no such directory or file"),
])
def test_bad_input_is_one_line_and_status_2(arguments, message, capsys):
    assert main(arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("so8t generate: error: ") and message in err[0], err


@pytest.mark.parametrize("threads, omp, expected", [(["--threads", "1"], None, [1]), ([], None, "default"),
                                                    ([], "2", [])], ids=["given", "default", "OMP_NUM_THREADS"])
def test_threads_are_set_before_the_model_loads_as_the_server_sets_them(threads, omp, expected, monkeypatch):
    import torch

    from so8t.commands.model_options import default_threads

    calls = []

    def load(*args, **kwargs):
        calls.append("load")
        raise RuntimeError("not loaded in this test")

    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(HFEngine, "load", load)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert main(["--model", "demo", *threads, "hi"]) == 2
    assert calls == ([default_threads()] if expected == "default" else expected) + ["load"]


def test_the_limits_and_defaults_are_the_servers():
    from so8t.commands.main import build_parser
    from so8t.serve.engines.base import DEFAULT_NEW_TOKENS, TERMINAL_TEMPERATURE
    from so8t.serve.schemas import ThinkRequest

    _, parsers = build_parser(with_options="generate")
    args = parsers["generate"].parse_args(["hi"])
    _, serve_parsers = build_parser(with_options="serve")
    shared = ("--model", "--adapter", "--threads")
    assert [_option(parsers["generate"], flag) for flag in shared] == [_option(serve_parsers["serve"], flag) for flag in shared]
    assert (args.max_new_tokens, args.temperature, args.top_p) == (DEFAULT_NEW_TOKENS, TERMINAL_TEMPERATURE, 1.0)
    schema = ThinkRequest.model_json_schema()["properties"]
    assert (schema["max_new_tokens"]["maximum"], schema["temperature"]["maximum"]) == (2048, 2.0)


def _option(parser, flag: str) -> tuple:
    [action] = [action for action in parser._actions if flag in action.option_strings]
    return action.option_strings, action.type, action.default, action.help
