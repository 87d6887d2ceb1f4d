"""``so8t <command>``: one module per subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``.

Adding a command is one line in ``COMMANDS``: its name, the module and a one-line description.

Only the module of the command being run is imported, and a command module imports nothing heavy at
its top (torch, transformers and peft take ~15 s to import on a 2-core machine): ``so8t --help``,
``so8t --version``, ``so8t <command> --help`` and argument errors answer at once.
tests/test_commands_main.py checks this for every command here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import select
import sys

from .. import __version__
from .noise import quiet_third_party_noise

EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a command ended by SIGPIPE

COMMANDS = {
    "train": ("so8t.commands.train", "QLoRA fine-tuning with SO(8) gates on the intermediate decoder layers"),
    "info": ("so8t.commands.info", "versions, devices and the kernel backend each op uses"),
    "report": ("so8t.commands.report", "rebuild a run's monitoring plots and summary, print the latest values per layer; "
                              "several runs: also on the same axes"),
    "serve": ("so8t.commands.serve", "serve a model over HTTP: /think and the OpenAI-compatible /v1 API, an optional "
                                     "safety judge, an HMAC-chained audit log"),
    "generate": ("so8t.commands.generate", "answer a prompt or chat in the terminal, streaming, with a so8t train adapter"),
    "audit": ("so8t.commands.audit", "verify a so8t serve audit log: its HMAC chain and its anchored heads"),
    "export": ("so8t.commands.export", "a finished run as a standalone Hugging Face model folder (LoRA merged, "
                                       "gates, tokenizer) that transformers and vLLM load"),
}


def build_parser(with_options: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``so8t`` parser and its subcommand parsers; only ``with_options``' module is imported to add
    its options (``so8t --help`` lists every command from ``COMMANDS`` alone)."""
    parser = argparse.ArgumentParser(prog="so8t", description="SO(8) rotation gates for Hugging Face decoder models")
    parser.add_argument("--version", action="version", version=f"so8t {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="command")
    parsers = {}
    for name, (module_name, description) in COMMANDS.items():
        parsers[name] = subcommands.add_parser(name, help=description, description=description)
        parsers[name].set_defaults(module_name=module_name)
        if name == with_options:
            importlib.import_module(module_name).add_arguments(parsers[name])
    return parser, parsers


def _command_name(argv: list[str]) -> str | None:
    # The top level has only flags without values (-h, --version): the first other word is the command.
    return next((word for word in argv if not word.startswith("-")), None)


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand ``args`` chose, e.g. ``so8t audit verify``'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _innermost(action.choices[getattr(args, action.dest)], args)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    message = f"unrecognized arguments: {' '.join(unknown)}"
    options = [option for action in parser._actions for option in action.option_strings]
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], options, n=1) if word.startswith("--") else []
        if close:
            message += f" (did you mean {close[0]}?)"
            break
    return message


def main(argv: list[str] | None = None) -> int:
    quiet_third_party_noise()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, parsers = build_parser(with_options=_command_name(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's usage, not the top level's: the mistake is in the command's options
        command = _innermost(parsers[args.command], args)
        command.error(_unrecognized(command, unknown))
    try:
        status = importlib.import_module(args.module_name).run(args)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's flush at exit
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket broke: not ours to hide
        # `so8t report RUN | head`: the reader has what it wanted; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush then succeeds
        return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file (a test's capture)
        return False


if __name__ == "__main__":
    sys.exit(main())
