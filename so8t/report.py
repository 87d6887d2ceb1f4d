"""``so8t report <dir>``: rebuilds a run's monitoring plots and summary.json from metrics.jsonl alone (no
model, no torch), prints the latest values per gated layer and points to the plots.

``<dir>`` is a run's output directory or its ``monitoring/`` directory. Missing or unreadable files
end with a one-line message and exit status 2; a file with no samples yet, with status 1.
"""

import argparse
import math
import sys
from pathlib import Path

from .monitor.plots import draw_plots
from .monitor.records import MetricsFileError, read_metrics
from .monitor.recorder import METRICS_FILE, SUMMARY_FILE
from .monitor.series import Series
from .monitor.summary import RunningExtremes, build_summary, write_summary

LAYER_COLUMNS = (
    ("alpha", "α"), ("gate", "σ(α)"), ("ortho_residual_max", "resid max"), ("theta_norm_max", "‖θ‖ max"),
    ("rotation_dist_mean", "‖R−I‖ mean"), ("act_rms", "act rms"), ("act_max_abs", "act max|y|"),
    ("grad_theta", "∇θ"), ("grad_alpha", "∇α"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="a run's output directory, or its monitoring/ directory")


def find_monitoring_dir(directory: Path) -> Path:
    for candidate in (directory, directory / "monitoring"):
        if (candidate / METRICS_FILE).is_file():
            return candidate
    raise MetricsFileError(
        f"no {METRICS_FILE} in {directory} or {directory / 'monitoring'}: "
        "not a run trained with the so8t monitor (so8t train without --no-monitor)"
    )


def rebuild(monitoring: Path) -> tuple[Series, dict, list[Path]]:
    info, samples, alerts = read_metrics(monitoring / METRICS_FILE)
    series = Series.from_samples(info, samples)
    extremes = RunningExtremes()
    for sample in samples:
        extremes.add(sample)
    summary = build_summary(info, extremes, samples[-1] if samples else None, alerts)
    if not samples:
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
    lines = [
        f"{monitoring}: {len(series)} samples, steps {series.steps[0]} … {series.steps[-1]} "
        f"(every {info.interval}), {len(info.layers)} gated layers, {len(info.lora_groups)} LoRA groups",
        f"latest sample: step {latest['step']}, epoch {_number(latest['epoch'])}",
        "",
    ]
    header = ["layer"] + [title for _, title in LAYER_COLUMNS]
    rows = [[f"L{layer}"] + [_number(latest[name][i]) for name, _ in LAYER_COLUMNS] for i, layer in enumerate(info.layers)]
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    lines.append("")
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


def run(args: argparse.Namespace) -> int:
    try:
        monitoring = find_monitoring_dir(args.directory)
        series, summary, plots = rebuild(monitoring)
    except MetricsFileError as error:
        print(f"so8t report: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"so8t report: cannot read or write the monitoring files: {error}", file=sys.stderr)
        return 2
    if not len(series):
        print(f"so8t report: {monitoring / METRICS_FILE} has no samples yet (the first is taken at step 1)",
              file=sys.stderr)
        return 1
    print(format_report(monitoring, series, summary, plots))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="so8t report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
