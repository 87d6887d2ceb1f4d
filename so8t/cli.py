"""``so8t <command>``: one module per subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``.

Adding a command is one line in ``COMMANDS``: its name, the module and a one-line description.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .import_noise import silence_import_noise

COMMANDS = {
    "train": ("so8t.train", "QLoRA fine-tuning with SO(8) gates on the intermediate decoder layers"),
    "info": ("so8t.info", "versions, devices and the kernel backend each op uses"),
    "report": ("so8t.report", "rebuild a run's monitoring plots and summary, print the latest values per layer"),
    "serve": ("so8t.serve.command", "the /think endpoint (FastAPI) with a safety judge and a hash-chained audit log"),
    "audit": ("so8t.audit", "check the hash chain of a so8t serve audit log"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so8t", description="SO(8) rotation gates for Hugging Face decoder models")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module_name, description) in COMMANDS.items():
        command = subcommands.add_parser(name, help=description, description=description)
        command.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_import_noise()
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module_name).run(args)


if __name__ == "__main__":
    sys.exit(main())
