"""``python benchmarks/run.py``: every so8t_kernels op on every usable backend, against a copy, a sum
and the obvious PyTorch code, all measured in the same run; ``--suites all`` adds the training-step suites.

The default (the ``ops`` suite: every op against its baselines) takes about a minute on a 2-core CPU; the training-step suites train
the demo model dozens of times (tens of minutes on such a CPU) and run only when named in ``--suites``.
Each suite's table is printed as soon as it finishes; what the suites themselves print (Trainer logs,
progress bars) goes to ``benchmark-<device>.log`` in ``--out``, not to the terminal. Also written there
after every benchmark: ``benchmark-<device>.{csv,json,md}``: the CSV and JSON carry the machine,
versions, commit and timestamp; the Markdown is a section ready to paste into ``benchmarks/RESULTS.md``.
CPU: ``time.perf_counter`` medians after warm-up on ``--threads`` threads; GPU:
``triton.testing.do_bench``. A timing never fails the run; an op that raises is reported and makes the
exit status 1.
"""

import argparse
import contextlib
import csv
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import (
    BENCHMARKS,
    DTYPES,
    FULL_PLAN,
    KINDS,
    QUICK_PLAN,
    Context,
    Row,
    TargetResult,
    evaluate_targets,
)

BENCHMARK_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARK_DIR.parent
# The checkout's so8t_kernels, installed or not (the GPU check runs in a copy with nothing installed).
sys.path.insert(0, str(REPO_ROOT))
# The modules whose @benchmark functions run, in order. A new suite is its module plus one entry here:
# in DEFAULT_SUITES if it takes seconds, in LONG_SUITES (run only when named) if it takes minutes.
DEFAULT_SUITES = ("ops",)
LONG_SUITES = ("loss_step", "train_step_gates", "train_step_monitor", "train_step_gates_real")
SUITES = DEFAULT_SUITES + LONG_SUITES
PASS_ORDER = ("-", "fwd", "fwd+stats", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="triton,cpp,torch",
                        help="comma-separated so8t_kernels backends to time, if usable (default: all)")
    parser.add_argument("--dtypes", help=f"comma-separated, from {','.join(DTYPES)} (default: fp32 on CPU, fp32,bf16 on GPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    parser.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                        help=f"comma-separated benchmark modules, from {','.join(SUITES)}, or `all` (default: "
                             f"%(default)s; the training-step suites take tens of minutes on a 2-core CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/8 of the tokens, short timings")
    parser.add_argument("--out", type=Path, default=BENCHMARK_DIR / "out")
    parser.add_argument("--predicted", type=Path, metavar="AOT_JSON",
                        help="also print the static roofline prediction (benchmarks/roofline.py) from these "
                             "`python -m so8t_kernels.aot --json` records, labelled predicted")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or ("fp32,bf16" if args.device == "cuda" else "fp32")
    args.suites = ",".join(SUITES) if args.suites == "all" else args.suites
    for option, chosen, allowed in (("--dtypes", args.dtypes, DTYPES), ("--suites", args.suites, SUITES)):
        unknown = set(chosen.split(",")) - set(allowed)
        if unknown:
            parser.error(f"{option}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    return args


# ---------------------------------------------------------------------------------------------
# Machine and versions
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short=12", "HEAD") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git repository)"


def machine_info(device: torch.device, backends: list[str], skipped: dict[str, str], args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}",
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU timings: the 1-minute load average at start (and end).
        "load_average_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "backends": backends,
        "skipped_backends": skipped,
        "dtypes": args.dtypes.split(","),
        "quick": args.quick,
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
    }


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def number(value: float | None) -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


TABLE_HEADER = ("op", "pass", "impl", "shape", "dtype", "median ms", "IQR ms", "n", "GB/s", "% copy",
                "× clone", "× sum", "× baselines")


def table_cells(row: Row) -> tuple[str, ...]:
    baselines = " ".join(f"{impl} {number(ratio)}" for impl, ratio in row.ratios.items() if impl not in ("clone", "sum"))
    return (
        row.op, row.pass_, row.impl, row.shape, row.dtype, number(row.timing.median_ms), number(row.timing.iqr_ms),
        str(row.timing.samples), number(row.gbps),
        "" if row.pct_copy is None else f"{row.pct_copy:.0f}",
        number(row.ratios.get("clone")), number(row.ratios.get("sum")), baselines,
    )


def text_table(rows: list[Row]) -> str:
    cells = [TABLE_HEADER, *map(table_cells, rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    lines, previous_op = [], None
    for index, line in enumerate(cells):
        op = line[0] + line[4]
        if index > 1 and op != previous_op:
            lines.append("")
        previous_op = op
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def target_line(result: TargetResult) -> str:
    target = result.target
    if result.value is None:
        measured = "not measured in this run"
    else:
        verdict = "met" if result.met else "missed"
        measured = f"{result.dtype} {result.impl}: {number(result.value)} → {verdict}"
    return f"[{target.level}] {target.describe()}: {measured}"


def legend(device: torch.device) -> str:
    timing = ("CPU: time.perf_counter median and IQR of n calls after warm-up"
              if device.type == "cpu" else "GPU: triton.testing.do_bench median and IQR")
    return (f"{timing}. GB/s: the bytes an ideal kernel must move ÷ median; % copy: of the clone's GB/s "
            "on the same tensor. × ref: median ÷ the ref's median in this run (< 1: faster).")


def reading_order(rows: list[Row]) -> list[Row]:
    """Grouped by suite, op and dtype (in the order measured); in a group by pass, then reference,
    baseline, so8t."""
    groups: dict[tuple, int] = {}
    for row in rows:
        groups.setdefault((row.suite, row.op, row.dtype), len(groups))

    def key(row: Row):
        pass_rank = PASS_ORDER.index(row.pass_) if row.pass_ in PASS_ORDER else len(PASS_ORDER)
        return groups[(row.suite, row.op, row.dtype)], pass_rank, KINDS.index(row.kind)

    return sorted(rows, key=key)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def row_record(row: Row) -> dict:
    return {
        "suite": row.suite, "op": row.op, "pass": row.pass_, "impl": row.impl, "kind": row.kind,
        "shape": row.shape, "dtype": row.dtype, "median_ms": row.timing.median_ms, "q25_ms": row.timing.q25_ms,
        "q75_ms": row.timing.q75_ms, "iqr_ms": row.timing.iqr_ms, "min_ms": row.timing.min_ms,
        "samples": row.timing.samples,
        "bytes": row.bytes_moved, "gbps": row.gbps, "pct_copy": row.pct_copy, "ratios": row.ratios,
    }


def markdown_section(info: dict, rows: list[Row], targets: list[TargetResult], errors: list[str], wall_s: float) -> str:
    """A section for benchmarks/RESULTS.md: date, machine, versions, command, table, targets."""
    gpu = f"; GPU {info['device']}" if info["device_type"] == "cuda" else ""
    skipped = "".join(f"; {name} skipped ({why})" for name, why in info["skipped_backends"].items())
    lines = [
        f"### {info['device']} — {info['timestamp'][:10]}",
        "",
        f"- Machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch threads {info['threads']}{gpu}; load average "
        f"{info['load_average_start']:.1f} at start, {info['load_average_end']:.1f} at end",
        f"- Versions: Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}",
        f"- Commit {info['commit']}, {info['timestamp']}; backends timed: {', '.join(info['backends'])}{skipped}",
        f"- Command: `{info['command']}` ({wall_s:.0f} s)",
        "",
        legend(torch.device(info["device_type"])),
        "",
        markdown_table(rows),
        "",
        "Targets:",
        "",
        *(f"- {target_line(result)}" for result in targets),
        *(f"- error: {error}" for error in errors),
    ]
    return "\n".join(lines) + "\n"


def write_files(out: Path, info: dict, rows: list[Row], targets: list[TargetResult], errors: list[str],
                wall_s: float) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"benchmark-{info['device_type']}"
    records = [row_record(row) for row in rows]
    target_records = [
        {"level": r.target.level, "target": r.target.describe(), "dtype": r.dtype, "impl": r.impl,
         "value": r.value, "met": r.met}
        for r in targets
    ]
    document = {"machine": info, "wall_s": wall_s, "rows": records, "targets": target_records, "errors": errors}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")

    # CSV: one flat line per row, each carrying the machine columns; one "x_<ref>" column per reference.
    meta_columns = ["device", "cpu_model", "cpu_cores", "threads", "load_average_start", "load_average_end",
                    "python", "torch", "cuda", "triton", "commit", "timestamp"]
    references = list(dict.fromkeys(ref for record in records for ref in record["ratios"]))
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        row_columns = [key for key in records[0] if key != "ratios"] if records else []
        writer.writerow(meta_columns + row_columns + [f"x_{ref}" for ref in references])
        for record in records:
            writer.writerow([info[c] for c in meta_columns] + [record[c] for c in row_columns]
                            + [record["ratios"].get(ref, "") for ref in references])

    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown_section(info, rows, targets, errors, wall_s))
    return [csv_path, json_path, md_path]


@contextlib.contextmanager
def output_to(log_path: Path):
    """Sends everything written to stdout and stderr inside (Python, C++ and child processes alike) to
    ``log_path``, appended; the terminal keeps only run.py's own lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log_path.open("a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            # The file descriptors for C++ and child processes and for handlers that kept the old
            # sys.stderr (logging's); sys.stdout and sys.stderr for Python code, also where they are
            # not file descriptors 1 and 2 (a notebook, pytest's capture).
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the Triton interpreter is for tests, never timed. Unset it.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from so8t_kernels import BACKENDS
    from so8t_kernels._backend import why_unusable

    wanted = args.backends.split(",")
    unknown = set(wanted) - set(BACKENDS)
    if unknown:
        print(f"--backends: unknown {sorted(unknown)}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    skipped = {name: why_unusable(name, device) for name in BACKENDS if name in wanted}
    backends = [name for name, why in skipped.items() if why is None]
    skipped = {name: why for name, why in skipped.items() if why is not None}

    for suite in SUITES:
        if suite in args.suites.split(","):
            importlib.import_module(suite)
    context = Context(device, [DTYPES[name] for name in args.dtypes.split(",")], backends, args.quick,
                      QUICK_PLAN if args.quick else FULL_PLAN)
    info = machine_info(device, backends, skipped, args)
    print(f"so8t benchmarks on {info['device']} ({info['cpu_cores']} cores, torch threads {info['threads']}) — "
          f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}, commit {info['commit']}")
    print(f"backends: {', '.join(backends) or 'none'}"
          + "".join(f"; skipped {name}: {why}" for name, why in skipped.items()))
    if device.type == "cpu" and info["load_average_start"] > 0.5:
        print(f"warning: load average {info['load_average_start']:.1f} on {info['cpu_cores']} cores before the "
              "run: other processes share the CPU and slow some timings more than others")
    sys.stdout.flush()

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"benchmark-{device.type}.log"
    log_path.write_text("")  # this run's output only
    print(f"what the suites print (training logs, progress bars) goes to {log_path}\n\n{legend(device)}", flush=True)

    started = time.perf_counter()
    rows: list[Row] = []
    paths, wall_s = [], 0.0
    # Only the chosen suites: a suite that imports another's helpers also registers that one's benchmarks.
    for suite in dict.fromkeys(name for name, _ in BENCHMARKS if name in args.suites.split(",")):
        print(f"\n== {suite}", flush=True)
        suite_rows: list[Row] = []
        for bench in (bench for name, bench in BENCHMARKS if name == suite):
            context.suite = suite
            print(f"  {bench.__name__} …", end="", flush=True)
            bench_started, new_rows = time.perf_counter(), []
            with output_to(log_path), context.recording_errors(f"{suite}.{bench.__name__}"):
                new_rows = bench(context)
            print(f" {time.perf_counter() - bench_started:.1f} s", flush=True)
            suite_rows += new_rows
            rows = reading_order(rows + new_rows)
            # Written after every benchmark, so that a run cut short (a GPU lease, a timeout) leaves its rows.
            wall_s = time.perf_counter() - started
            info["load_average_end"] = os.getloadavg()[0]
            paths = write_files(args.out, info, rows, evaluate_targets(rows, device.type), context.errors, wall_s)
        print(f"\n{text_table(reading_order(suite_rows))}", flush=True)
        measured = {row.op for row in suite_rows}
        suite_targets = [result for result in evaluate_targets(suite_rows, device.type) if result.target.op in measured]
        if suite_targets:
            print(f"\nTargets ({device.type}; reported, never enforced):")
            for result in suite_targets:
                print(f"  {target_line(result)}")

    if args.predicted is not None:
        import roofline

        print("\n== predicted, not measured: static roofline from the compiled SASS (benchmarks/roofline.py)")
        print(roofline.text(roofline.estimate(roofline.load_records(args.predicted))), flush=True)

    for error in context.errors:
        print(f"error: {error}")
    not_run = [suite for suite in SUITES if suite not in args.suites.split(",")]
    if not_run:
        print(f"\nnot run: {', '.join(not_run)} (name them in --suites, or --suites all)")
    print(f"\n{wall_s:.0f} s; wrote {', '.join(str(path) for path in paths)}; suite output in {log_path}")
    return 1 if context.errors else 0


if __name__ == "__main__":
    sys.exit(main())
