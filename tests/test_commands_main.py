"""``so8t`` answers --help, --version and argument errors without importing torch (or transformers, peft,
bitsandbytes), for every registered command, and an argument error shows the command's own usage."""

import subprocess
import sys
from pathlib import Path

import pytest

from so8t import __version__
from so8t.commands.main import COMMANDS

HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton"}


def _so8t(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs ``python -X importtime -m so8t ARGS``; the result (stderr without the import lines) and the
    top-level packages that were imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "so8t", *args],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    result.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
    return result, imported


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[name, "--help"] for name in COMMANDS]],
                         ids=" ".join)
def test_help_and_version_import_nothing_heavy(args):
    result, imported = _so8t(*args)
    assert result.returncode == 0, result.stderr
    assert not imported & HEAVY, f"so8t {' '.join(args)} imported {sorted(imported & HEAVY)}"
    expected = {"--help": "usage: so8t [-h]", "--version": f"so8t {__version__}"}.get(args[0], f"usage: so8t {args[0]} ")
    assert result.stdout.startswith(expected), result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_an_argument_error_shows_the_commands_usage_and_imports_nothing_heavy(name):
    result, imported = _so8t(name, "--no-such-option")
    assert result.returncode == 2
    assert not imported & HEAVY, f"so8t {name} --no-such-option imported {sorted(imported & HEAVY)}"
    assert result.stderr.startswith(f"usage: so8t {name} "), result.stderr
    assert f"so8t {name}: error: " in result.stderr, result.stderr


def test_a_misspelt_option_names_the_one_meant():
    result, _ = _so8t("train", "--max-stesp", "5")
    assert result.returncode == 2
    assert "so8t train: error: unrecognized arguments: --max-stesp 5 (did you mean --max-steps?)" in result.stderr


def test_an_unknown_option_of_a_subsubcommand_shows_its_usage(tmp_path):
    result, _ = _so8t("audit", "verify", str(tmp_path / "audit.db"), "--key-file", str(tmp_path / "key"), "--ancors", "a")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: so8t audit verify "), result.stderr
    assert "so8t audit verify: error: unrecognized arguments: --ancors a (did you mean --anchors?)" in result.stderr


def test_the_readme_documents_every_command_the_version_and_the_openapi_page():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in COMMANDS:
        assert f"so8t {name}" in readme, name
    assert "so8t --version" in readme and "GET /docs" in readme
    assert "folder that contains it" in " ".join(readme.split())  # the clone-named-so8t import pitfall


def test_the_readme_is_short_has_contents_and_no_measurements_of_the_machines_it_was_written_on():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "## Contents" in readme
    for machine_talk in ("2-core", "loaded machine", "load average", "on a quiet"):
        assert machine_talk not in readme, machine_talk  # measured figures live in benchmarks/RESULTS.md


@pytest.mark.parametrize("name", ["train", "report", "generate"])
def test_python_dash_m_so8t_is_the_so8t_command(name):
    """``python -m so8t train`` (what ``torchrun -m so8t train`` runs) parses, errs and stays light like ``so8t train``."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "so8t", name, "--no-such-option"],
                            capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert result.returncode == 2 and not imported & HEAVY, sorted(imported & HEAVY)
    assert f"so8t {name}: error: " in result.stderr and f"usage: so8t {name} " in result.stderr


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback(tmp_path):
    # Only a closed stdout is stopped quietly (tests/test_monitor_report.py); stdout here stays open.
    code = ("import sys, so8t.commands.report as report; from so8t.commands.main import main\n"
            "def run(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "report.run = run; sys.exit(main(['report', sys.argv[1]]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "BrokenPipeError" in result.stderr, result.stderr
