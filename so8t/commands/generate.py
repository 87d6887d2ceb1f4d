"""``so8t generate``: try a model, or what ``so8t train`` made of it, from the terminal.

With a prompt it answers once; without one it is a chat on stdin (one message per line; the conversation
so far is rendered through the model's chat template each turn, the oldest turns dropped when it outgrows
the context; Ctrl-D or ``/exit`` ends it). It runs on the engine of ``so8t serve`` (same batching loop,
sampling, stop handling and thinking parser): the answer streams to stdout as it is generated, the
thinking (``<think>…</think>``) left out unless ``--show-thinking``; the token count and tokens/s go to
stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from ..errors import SO8TError
from ..serve.engines.base import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_TOP_P,
    GREEDY_BELOW,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    TERMINAL_TEMPERATURE,
    sampling_errors,
)
from .library_bars import quiet_library_bars_off_terminal
from .model_options import add_model_arguments, inference_model, set_torch_threads

EXIT_COMMAND = "/exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the question; without it, an interactive chat on stdin")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                        help=f"per answer, 1–{MAX_NEW_TOKENS} (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=TERMINAL_TEMPERATURE,
                        help=f"0–{MAX_TEMPERATURE:g}; below {GREEDY_BELOW:g} decodes greedily, the same answer every time "
                             "(default: %(default)s; so8t serve's API defaults to 0.7)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                        help="nucleus sampling mass, (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--show-thinking", action="store_true", help="print the <think>…</think> part too")


class Chat:
    """A loaded engine and the conversation so far; ``answer`` streams one reply."""

    def __init__(self, engine, args: argparse.Namespace):
        from ..serve.engines.base import SamplingParams

        self.engine = engine
        self.show_thinking = args.show_thinking
        self.sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
        self.messages: list[dict] = []

    def encode(self):
        """The conversation through the chat template; the oldest turns go while it does not fit the context."""
        from ..serve.engines.base import ContextOverflow

        while True:
            try:
                return self.engine.encode(self.messages, self.sampling.max_new_tokens)
            except ContextOverflow as overflow:
                if len(self.messages) == 1:
                    raise SO8TError(f"{overflow.reason} (--max-new-tokens {self.sampling.max_new_tokens})") from None
                self.messages = self.messages[2:]

    def answer(self, prompt: str) -> str:
        import asyncio

        self.messages.append({"role": "user", "content": prompt})
        try:
            encoded = self.encode()
        except SO8TError:
            self.messages.pop()
            raise
        started = time.perf_counter()
        completion, parsed, hidden_chars = asyncio.run(self._stream(encoded))
        elapsed = time.perf_counter() - started
        print(flush=True)
        hidden = f"; thinking hidden ({hidden_chars} characters)" if hidden_chars else ""
        print(f"[{completion.new_tokens} tokens in {elapsed:.1f} s, {completion.new_tokens / elapsed:.1f} tokens/s{hidden}]",
              file=sys.stderr, flush=True)
        self.messages.append({"role": "assistant", "content": parsed.answer})
        return parsed.answer

    async def _stream(self, encoded):
        import contextlib

        from ..serve.engines.base import EngineRequest, TextDelta
        from ..serve.thinking import ANSWER, ThinkingStream

        thinking, completion, hidden_chars = ThinkingStream(encoded.opens_thinking), None, 0

        def show(pieces) -> None:
            nonlocal hidden_chars
            for piece in pieces:
                if piece.kind == ANSWER or self.show_thinking:
                    print(piece.text + (piece.tag if self.show_thinking else ""), end="", flush=True)
                else:
                    hidden_chars += len(piece.text)

        request = EngineRequest(uuid.uuid4().hex, encoded, self.sampling)
        async with contextlib.aclosing(self.engine.stream(request)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    show(thinking.feed(event.text))
                else:
                    completion = event
        show(thinking.finish())
        return completion, thinking.parsed(), hidden_chars


def _check(args: argparse.Namespace) -> None:
    errors = sampling_errors(args.max_new_tokens, args.temperature, args.top_p)
    if errors:
        field, reason = errors[0]
        raise SO8TError(f"--{field.replace('_', '-')} {reason}")
    if args.prompt is not None and not args.prompt.strip():
        raise SO8TError("the prompt is empty")


def _load(args: argparse.Namespace):
    from ..serve.engines.hf import HFEngine

    model = inference_model(args.model, args.adapter)
    set_torch_threads(args.threads)
    quiet_library_bars_off_terminal()
    try:
        return HFEngine.load(model, args.adapter, max_batch=1)
    except SO8TError:
        raise
    except Exception as error:  # loading runs arbitrary library code: a model that does not load, not a crash
        raise SO8TError(f"cannot load the model ({model}): {type(error).__name__}: {error}") from None


def _chat_loop(chat: Chat) -> None:
    interactive = sys.stdin.isatty()
    print(f"so8t generate: chatting with {chat.engine.name}; {EXIT_COMMAND} or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == EXIT_COMMAND:
            break
        if not line.strip():
            continue
        try:
            chat.answer(line)
        except SO8TError as error:
            print(f"so8t generate: {error}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    engine = None
    try:
        _check(args)
        engine = _load(args)
        import torch

        torch.manual_seed(args.seed)  # after loading: the demo model's weights are drawn from a seed too
        chat = Chat(engine, args)
        if args.prompt is not None:
            chat.answer(args.prompt)
        else:
            _chat_loop(chat)
    except SO8TError as error:
        print(f"so8t generate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        if engine is not None:
            engine.shutdown()
    return 0
