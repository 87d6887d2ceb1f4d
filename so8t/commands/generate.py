"""``so8t generate``: try a model, or what ``so8t train`` made of it, from the terminal.

With a prompt it answers once; without one it is a chat on stdin (one message per line; the conversation
so far is rendered through the model's chat template each turn; Ctrl-D or ``/exit`` ends it). The answer
streams to stdout as it is generated, the thinking (``<think>…</think>``) left out unless
``--show-thinking``; the token count and tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import SO8TError

EXIT_COMMAND = "/exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the question; without it, an interactive chat on stdin")
    parser.add_argument("--model", help="hub id, directory or .gguf file of a causal LM "
                                        "(default: the embedded demo, no download)")
    parser.add_argument("--adapter", help="a so8t train output directory: LoRA adapter, SO8T gates (so8t/), tokenizer")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 decodes greedily, the same answer every time (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--show-thinking", action="store_true", help="print the <think>…</think> part too")


class ThinkingFilter:
    """Passes streamed text to ``write``, leaving out what lies between the thinking tags unless
    ``show_thinking``. A tag may arrive split over several chunks: a chunk's end that could begin one is
    held back until the next chunk decides."""

    def __init__(self, write, show_thinking: bool):
        from ..data.dataset import THINK_CLOSE, THINK_OPEN

        self.tags = {False: THINK_OPEN, True: THINK_CLOSE}  # the tag that ends the current state
        self.write = write
        self.show_thinking = show_thinking
        self.thinking = False
        self.pending = ""
        self.answer = ""  # everything outside the thinking, shown or not
        self.hidden_chars = 0

    def feed(self, text: str) -> None:
        self.pending += text
        while True:
            tag = self.tags[self.thinking]
            index = self.pending.find(tag)
            if index < 0:
                break
            self._emit(self.pending[:index])
            if self.show_thinking:
                self.write(tag)
            self.pending = self.pending[index + len(tag):]
            self.thinking = not self.thinking
        held = next((size for size in range(min(len(tag) - 1, len(self.pending)), 0, -1)
                     if tag.startswith(self.pending[-size:])), 0)
        self._emit(self.pending[:len(self.pending) - held])
        self.pending = self.pending[len(self.pending) - held:]

    def finish(self) -> None:
        self._emit(self.pending)
        self.pending = ""

    def _emit(self, text: str) -> None:
        if not text:
            return
        if not self.thinking:
            self.answer += text
        if self.thinking and not self.show_thinking:
            self.hidden_chars += len(text)
        else:
            self.write(text)


def _streamer(tokenizer, dropped_ids: set[int], thinking: ThinkingFilter):
    import torch
    from transformers import TextStreamer

    class ThinkingStreamer(TextStreamer):
        """TextStreamer that drops special tokens except the thinking tags (which may be special tokens,
        as in the embedded tokenizer) and hands its text to the thinking filter."""

        def put(self, value):
            value = value.reshape(-1)
            if not self.next_tokens_are_prompt:
                value = value[~torch.isin(value, torch.tensor(sorted(dropped_ids), dtype=value.dtype))]
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            thinking.feed(text)
            if stream_end:
                thinking.finish()

    return ThinkingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)


class Chat:
    """A loaded model and the conversation so far; ``answer`` streams one reply."""

    def __init__(self, generator, args: argparse.Namespace):
        from ..data.dataset import THINK_CLOSE, THINK_OPEN

        self.generator = generator
        self.args = args
        self.messages: list[dict] = []
        tokenizer = generator.tokenizer
        thinking_tags = set(tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])) - {tokenizer.unk_token_id}
        self.dropped_ids = set(tokenizer.all_special_ids) - thinking_tags
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self):
        """The conversation through the chat template; the oldest turns go while it does not fit the context."""
        from ..data.dataset import render_prompt

        tokenizer, context = self.generator.tokenizer, self.generator.context
        while True:
            text = render_prompt(tokenizer, self.messages)
            ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]
            if context is None or ids.shape[1] + self.args.max_new_tokens <= context or len(self.messages) == 1:
                break
            self.messages = self.messages[2:]
        if context is not None and ids.shape[1] + self.args.max_new_tokens > context:
            raise SO8TError(f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens {self.args.max_new_tokens} "
                            f"it does not fit the model's context of {context}")
        return ids

    def answer(self, prompt: str) -> str:
        import torch

        self.messages.append({"role": "user", "content": prompt})
        try:
            input_ids = self.encode().to(self.generator.device)
        except SO8TError:
            self.messages.pop()
            raise
        thinking = ThinkingFilter(lambda text: print(text, end="", flush=True), self.args.show_thinking)
        sampling = (dict(do_sample=True, temperature=self.args.temperature, top_p=self.args.top_p)
                    if self.args.temperature > 0 else dict(do_sample=False))
        started = time.perf_counter()
        streamer = _streamer(self.generator.tokenizer, self.dropped_ids, thinking)
        with torch.inference_mode():
            output = self.generator.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=self.args.max_new_tokens,
                pad_token_id=self.pad_token_id, streamer=streamer, **sampling,
            )
        elapsed = time.perf_counter() - started
        print(flush=True)
        new_tokens = output.shape[1] - input_ids.shape[1]
        hidden = f"; thinking hidden ({thinking.hidden_chars} characters)" if thinking.hidden_chars else ""
        print(f"[{new_tokens} tokens in {elapsed:.1f} s, {new_tokens / elapsed:.1f} tokens/s{hidden}]",
              file=sys.stderr, flush=True)
        self.messages.append({"role": "assistant", "content": thinking.answer.strip()})
        return thinking.answer


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise SO8TError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0.0 <= args.temperature <= 10.0:
        raise SO8TError(f"--temperature must be in [0, 10], got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise SO8TError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt is not None and not args.prompt.strip():
        raise SO8TError("the prompt is empty")


def _load(args: argparse.Namespace):
    from ..serve.generation import load_generator

    try:
        return load_generator(args.model, args.adapter)
    except SO8TError:
        raise
    except Exception as error:  # loading runs arbitrary library code: a model that does not load, not a crash
        raise SO8TError(f"cannot load the model ({args.model or 'embedded default'}): "
                        f"{type(error).__name__}: {error}") from None


def _chat_loop(chat: Chat) -> None:
    interactive = sys.stdin.isatty()
    print(f"so8t generate: chatting with {chat.generator.name}; {EXIT_COMMAND} or Ctrl-D ends", file=sys.stderr)
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
    try:
        _check(args)
        import torch

        torch.manual_seed(args.seed)
        chat = Chat(_load(args), args)
        if args.prompt is not None:
            chat.answer(args.prompt)
        else:
            _chat_loop(chat)
    except SO8TError as error:
        print(f"so8t generate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0
