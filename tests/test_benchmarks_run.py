"""``python benchmarks/run.py`` as a user meets it: the long training suites are opt-in, each suite's
table is printed when it finishes, and what the suites print goes to a log file it names, not to the
terminal. A fake suite stands in for the real ones (those take a minute and more)."""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from test_self_contained import OUTSIDE

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def run_module():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


def test_the_default_run_is_the_kernel_suite_and_long_suites_are_named(run_module):
    assert run_module.parse_args([]).suites == "ops"
    assert run_module.parse_args(["--suites", "all"]).suites.split(",") == list(run_module.SUITES)
    assert {"train_step_gates", "train_step_monitor"} <= set(run_module.LONG_SUITES)
    assert not set(run_module.LONG_SUITES) & set(run_module.DEFAULT_SUITES)


def _noisy_benchmark(name: str, op: str):
    def bench(ctx):
        print(f"{name}: Trainer log line")  # Python stdout
        print(f"{name}: 50%|#####     | 5/10 progress bar", file=sys.stderr)
        os.write(1, f"{name}: C-level write\n".encode())
        subprocess.run(["echo", f"{name}: child process"], check=True)
        from harness import Timing

        return [ctx.row(op, "fwd", "torch", "8", "fp32", Timing(2.0, 1.5, 2.5, 1.0, 3), kind="so8t")]

    bench.__name__ = f"{name}_benchmark"
    return bench


def test_tables_are_printed_per_suite_and_suite_output_goes_to_the_log(run_module, monkeypatch, tmp_path, capfd):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("first", "second"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(run_module, "SUITES", ("first", "second"))
    monkeypatch.setattr(run_module, "BENCHMARKS", [("first", _noisy_benchmark("first", "op one")),
                                                   ("second", _noisy_benchmark("second", "op two"))])
    threads = torch.get_num_threads()
    try:
        status = run_module.main(["--suites", "first,second", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    assert status == 0, out + err
    log = tmp_path / "benchmark-cpu.log"
    assert str(log) in out
    for name in ("first", "second"):
        for noise in ("Trainer log line", "50%|#####     | 5/10 progress bar", "C-level write", "child process"):
            assert f"{name}: {noise}" not in out + err
            assert f"{name}: {noise}" in log.read_text()
    # Each table right after its suite's header, in the order the suites ran.
    assert out.index("== first") < out.index("op one") < out.index("== second") < out.index("op two")
    assert (tmp_path / "benchmark-cpu.md").is_file() and "op two" in (tmp_path / "benchmark-cpu.md").read_text()


def test_help_names_the_suites_and_cites_nothing_outside_the_repository():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--help"], capture_output=True, text=True,
                            timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    assert "train_step_gates" in result.stdout and "all" in result.stdout
    assert not OUTSIDE.search(result.stdout), result.stdout
