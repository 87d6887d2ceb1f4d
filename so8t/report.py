"""``so8t report RUN [RUN ...]``: rebuilds each run's monitoring plots and summary.json from metrics.jsonl
alone (no model, no torch) and prints its latest values per layer; with two runs or more (a gated run
and its ``--no-so8t`` baseline, say) it also draws them on the same axes.

Each ``RUN`` is a run's output directory or its ``monitoring/`` directory. Missing or unreadable files
end with a one-line message and exit status 2; a file with no samples yet, with status 1.
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .monitor.losses import LOSS_LABELS
from .monitor.plots import draw_comparison, draw_plots
from .monitor.records import MetricsFileError, read_run
from .monitor.recorder import METRICS_FILE, SUMMARY_FILE
from .monitor.schema import BLOCK_NOTE, METRIC, format_layers
from .monitor.series import Series
from .monitor.summary import RunningExtremes, build_summary, write_summary

LAYER_COLUMNS = ("alpha", "gate", "ortho_residual_max", "theta_norm_max", "rotation_dist_mean", "act_rms",
                 "act_max_abs", "grad_theta", "grad_alpha")
COMPARISON_DIR = "compare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directories", nargs="+", type=Path, metavar="RUN",
                        help="a run's output directory, or its monitoring/ directory; two or more are also "
                             "drawn on the same axes")
    parser.add_argument("--compare-dir", type=Path, metavar="DIR",
                        help="where the plots of several runs go (default: the first run's "
                             f"monitoring/{COMPARISON_DIR}/<the other runs' names>/)")


def find_monitoring_dir(directory: Path) -> Path:
    for candidate in (directory, directory / "monitoring"):
        if (candidate / METRICS_FILE).is_file():
            return candidate
    if not directory.is_dir():
        raise MetricsFileError(f"no {METRICS_FILE} in {directory}: no such directory")
    if (directory / "trainer_state.json").is_file():
        raise MetricsFileError(
            f"no {METRICS_FILE} in {directory / 'monitoring'}: the run was trained with --no-monitor, "
            "so it has no monitoring files"
        )
    raise MetricsFileError(
        f"no {METRICS_FILE} in {directory} or {directory / 'monitoring'}: not a so8t train output directory"
    )


@dataclass
class Report:
    monitoring: Path
    series: Series
    summary: dict
    plots: list[Path]


def rebuild(monitoring: Path) -> tuple[Series, dict, list[Path]]:
    run = read_run(monitoring / METRICS_FILE)
    series = Series.from_samples(run.info, run.samples, run.losses.arrays())
    extremes = RunningExtremes()
    for sample in run.samples:
        extremes.add(sample)
    summary = build_summary(run.info, extremes, run.samples[-1] if run.samples else None, run.alerts, run.losses)
    if not run.samples:
        return series, summary, []
    write_summary(monitoring / SUMMARY_FILE, summary)
    return series, summary, draw_plots(series, monitoring / "plots")


def _number(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_report(monitoring: Path, series: Series, summary: dict, plots: list[Path]) -> str:
    info = series.info
    latest = series.row(len(series) - 1)
    if info.gated:
        layers = f"{len(info.layers)} gated layers ({format_layers(info.layers)})"
        columns = LAYER_COLUMNS
    else:
        layers = f"no gates (a baseline run): outputs of decoder layers {format_layers(info.layers)} measured"
        columns = tuple(name for name in LAYER_COLUMNS if not METRIC[name].gates_only)
    lines = [
        f"{monitoring}: {len(series)} samples, steps {series.steps[0]} … {series.steps[-1]} "
        f"(every {info.interval}), {layers}, {len(info.lora_groups)} LoRA groups",
        f"latest sample: step {latest['step']}, epoch {_number(latest['epoch'])}",
        "",
    ]
    header = ["layer"] + [METRIC[name].label for name in columns]
    rows = [[f"L{layer}"] + [_number(latest[name][i]) for name in columns] for i, layer in enumerate(info.layers)]
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if info.gated:
        lines.append(BLOCK_NOTE)
    lines.append("")
    for key, loss in summary.get("losses", {}).items():
        lines.append(f"{LOSS_LABELS[key]}: {_number(loss['final'])} at step {loss['step']} "
                     f"(lowest {_number(loss['min'])})")
    lines.append(
        "logits: " + "  ".join(f"{key} {_number(latest['logit_' + key])}" for key in ("mean", "std", "min", "max"))
        + f"  non-finite {_number(latest['logit_nonfinite'])}"
    )
    if info.lora_groups:
        lines.append("LoRA ∇: " + "  ".join(
            f"{group} {_number(value)}" for group, value in zip(info.lora_groups, latest["grad_lora"])))
    alerts = summary["alerts"]
    lines.append(f"alerts: {len(alerts) or 'none'}")
    lines += [f"  step {alert['step']}: {alert['kind']}: {alert['message']}" for alert in alerts]
    lines.append(f"plots: {monitoring / 'plots'}/ ({', '.join(path.name for path in plots)})")
    lines.append(f"summary: {monitoring / SUMMARY_FILE}")
    return "\n".join(lines)


def run_names(directories: list[Path]) -> list[str]:
    """Each run's directory name (its monitoring/ directory's parent), or the whole path where names repeat."""
    runs = [directory.parent if directory.name == "monitoring" else directory for directory in directories]
    names = [run.resolve().name for run in runs]
    return names if len(set(names)) == len(names) else [str(run) for run in runs]


def default_compare_dir(monitoring: Path, names: list[str]) -> Path:
    return monitoring / COMPARISON_DIR / "-vs-".join(name.replace("/", "_") for name in names[1:])


def run(args: argparse.Namespace) -> int:
    reports = []
    try:
        for directory in args.directories:
            monitoring = find_monitoring_dir(directory)
            series, summary, plots = rebuild(monitoring)
            if not len(series):
                print(f"so8t report: {monitoring / METRICS_FILE} has no samples yet (the first is taken at step 1)",
                      file=sys.stderr)
                return 1
            reports.append(Report(monitoring, series, summary, plots))
        compared = None
        if len(reports) > 1:
            names = run_names(args.directories)
            target = args.compare_dir or default_compare_dir(reports[0].monitoring, names)
            compared = target, draw_comparison([(name, r.series) for name, r in zip(names, reports)], target)
    except MetricsFileError as error:
        print(f"so8t report: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"so8t report: cannot read or write the monitoring files: {error}", file=sys.stderr)
        return 2
    print("\n\n".join(format_report(r.monitoring, r.series, r.summary, r.plots) for r in reports))
    if compared is not None:
        target, plots = compared
        print(f"\nruns on the same axes ({', '.join(names)}): {target}/ ({', '.join(p.name for p in plots)})")
        for key, label in LOSS_LABELS.items():
            finals = [r.summary.get("losses", {}).get(key) for r in reports]
            if any(finals):
                print(f"final {label}: " + ", ".join(
                    f"{name} {_number(final['final']) if final else '-'}" for name, final in zip(names, finals)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    return run_command("report", argv)


if __name__ == "__main__":
    sys.exit(main())
