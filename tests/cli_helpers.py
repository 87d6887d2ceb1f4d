"""``so8t COMMAND ARGS`` in the test process: what the console script runs, without a subprocess."""

from so8t.commands.main import main as so8t_main


def run_so8t(command: str, argv: list[str]) -> int:
    return so8t_main([command, *argv])


def train(argv: list[str]) -> int:
    return run_so8t("train", argv)


def report(argv: list[str]) -> int:
    return run_so8t("report", argv)


def generate(argv: list[str]) -> int:
    return run_so8t("generate", argv)
