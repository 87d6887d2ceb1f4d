"""A run's monitoring rebuilt from metrics.jsonl alone (no model, no torch): summary.json, the plots, and
the text ``so8t report`` prints (the latest values per layer, the losses, the alerts)."""

import math
from dataclasses import dataclass
from pathlib import Path

from .losses import LOSS_LABELS
from .plots import draw_plots
from .recorder import METRICS_FILE, SUMMARY_FILE
from .metrics_log import MetricsFileError, read_run
from .schema import BLOCK_NOTE, METRIC, format_layers
from .series import Series
from .summary import RunningExtremes, build_summary, write_summary

LAYER_COLUMNS = ("alpha", "gate", "ortho_residual_max", "theta_norm_max", "rotation_dist_mean", "act_rms",
                 "act_max_abs", "grad_theta", "grad_alpha")
COMPARISON_DIR = "compare"


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


def format_number(value: float) -> str:
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
        f"latest sample: step {latest['step']}, epoch {format_number(latest['epoch'])}",
        "",
    ]
    header = ["layer"] + [METRIC[name].label for name in columns]
    rows = [[f"L{layer}"] + [format_number(latest[name][i]) for name in columns] for i, layer in enumerate(info.layers)]
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if info.gated:
        lines.append(BLOCK_NOTE)
    lines.append("")
    for key, loss in summary.get("losses", {}).items():
        lines.append(f"{LOSS_LABELS[key]}: {format_number(loss['final'])} at step {loss['step']} "
                     f"(lowest {format_number(loss['min'])})")
    lines.append(
        "logits: " + "  ".join(f"{key} {format_number(latest['logit_' + key])}" for key in ("mean", "std", "min", "max"))
        + f"  non-finite {format_number(latest['logit_nonfinite'])}"
    )
    if info.lora_groups:
        lines.append("LoRA ∇: " + "  ".join(
            f"{group} {format_number(value)}" for group, value in zip(info.lora_groups, latest["grad_lora"])))
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
