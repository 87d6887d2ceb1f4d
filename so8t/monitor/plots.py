"""The monitor's PNGs, drawn from a Series with matplotlib's object API (no pyplot: no global state, no
GUI backend, safe off the main thread).

- loss.png: the training loss the Trainer logged, and the eval loss when there was an evaluation.
- orthogonality.png: residual max per layer × step (heatmap, log10) and its max over layers (log scale).
- gate.png: σ(α) per layer vs step, with the end of warmup and the target σ(α).
- logits.png: mean ± std band with min and max; non-finite logits marked.
- predictions.png: the mean entropy of the predicted distribution and the top-1 accuracy (only when
  they were measured: the fused loss of ``so8t train`` reduces them, the model's own loss does not).
- activations.png: rms and max |y| of the gate output per layer.
- gradients.png: gradient norms of θ and α per layer and of the LoRA groups (log scale; exact zeros
  marked, since they vanish on a log axis and are what the dead-gradient alert is about).

A run without gates (a baseline) has no orthogonality or gate plot, and no θ or α gradients; its
activations are its decoder layers' outputs. ``draw_comparison`` puts several runs on the same axes.
"""

import math
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from .export import partial_name
from .losses import LOSS_LABELS
from .schema import METRIC
from .series import Series

RESIDUAL_FLOOR = 1e-12  # log scale: an exactly orthogonal fp32 R has residual 0
RESIDUAL_SCALE_BOTTOM = -8.0  # log10; healthy fp32 rotations sit near 1e-7
MAX_LEGEND_ENTRIES = 10  # more layers than this get a colour bar instead of a legend entry each
MAX_LAYER_TICKS = 12  # heatmap row labels: at ~14 px each, more would overlap on a 3.2-inch panel
MARKED_POINTS_UP_TO = 20  # samples: with this few, every one is drawn as a marker (a single one is no line)
PANEL_HEIGHT, WIDTH = 3.2, 10.0  # inches
# matplotlib's text rendering (FreeType) is not thread-safe: one monitor figure at a time per process.
_DRAWING = threading.Lock()


def draw_plots(series: Series, directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not len(series):
        return []
    with _DRAWING:
        return [_save(figure, directory / f"{name}.png") for name, figure in build_figures(series)]


def draw_comparison(runs: list[tuple[str, Series]], directory: Path) -> list[Path]:
    """Several runs (name, series) on the same axes, one colour per run."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _DRAWING:
        return [_save(figure, directory / f"{name}.png") for name, figure in build_comparison_figures(runs)]


def _save(figure, path: Path) -> Path:
    partial = path.with_name(partial_name(path.name))
    figure.savefig(partial, dpi=100, format="png")
    partial.replace(path)
    return path


def _figure(rows: int):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Constrained layout keeps axis labels, outside legends and colour bars inside the image.
    figure = Figure(figsize=(WIDTH, PANEL_HEIGHT * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 0.6, 0.8, … around a single one
    return figure, axes


def _plottable(series: Series) -> Series:
    """The series with ±inf as NaN: a diverged run's values are drawn as gaps (matplotlib skips both
    alike), its non-finite counts mark where, and no reduction over them warns."""
    return replace(series, values={name: np.where(np.isfinite(values), values, np.nan)
                                   for name, values in series.values.items()})


def build_figures(series: Series) -> list[tuple[str, object]]:
    """(name, matplotlib Figure) per plot of one run."""
    series = _plottable(series)
    gated = series.info.gated
    plots = [("loss", _loss, 1)] if series.losses else []
    if gated:
        plots += [("orthogonality", _orthogonality, 2), ("gate", _gate, 1)]
    plots += [("logits", _logits, 1)]
    if np.isfinite(series.values["entropy"]).any() or np.isfinite(series.values["top1_accuracy"]).any():
        plots += [("predictions", _predictions, 2)]
    plots += [("activations", _activations, 2), ("gradients", _gradients, 3 if gated else 1)]
    figures = []
    for name, draw, rows in plots:
        figure, axes = _figure(rows)
        draw(series, axes)
        figures.append((name, figure))
    return figures


def _points(count: int) -> dict:
    return {"marker": "o", "markersize": 3} if count <= MARKED_POINTS_UP_TO else {}


def _legend_outside(ax) -> None:
    """To the right of the axes, where it can cover no curve and no text."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _layer_lines(ax, series: Series, values: np.ndarray, labels: list[str], title: str = "decoder layer",
                 **style) -> None:
    """One line per layer (or group), coloured shallow (dark) to deep (yellow); a legend entry each for a
    few, a colour bar naming some of them for many."""
    from matplotlib import cm, colormaps, colors

    cmap = colors.ListedColormap(colormaps["viridis"](np.linspace(0, 0.9, 256)))  # no pale yellow end
    colours = cmap(np.linspace(0, 1, max(len(labels), 1)))
    few = len(labels) <= MAX_LEGEND_ENTRIES
    for column, label in enumerate(labels):
        ax.plot(series.steps, values[:, column], color=colours[column], label=label if few else None,
                **(_points(len(series)) | style))
    if not few:
        bar = ax.figure.colorbar(cm.ScalarMappable(colors.Normalize(0, len(labels) - 1), cmap), ax=ax,
                                 pad=0.01, aspect=15, label=title)
        shown = list(range(0, len(labels), math.ceil(len(labels) / MAX_LAYER_TICKS)))
        bar.set_ticks(shown, labels=[labels[i] for i in shown])


def _layer_labels(series: Series) -> list[str]:
    return [f"L{layer}" for layer in series.info.layers]


def _loss(series: Series, axes) -> None:
    (ax,) = axes
    _loss_lines(ax, series, "tab:blue", "", eval_colour="tab:orange")
    ax.set_ylabel("loss")
    ax.set_title("Loss (as the Trainer logged it)")
    _legend_outside(ax)


def _loss_lines(ax, series: Series, colour, prefix: str, eval_colour=None) -> None:
    """Eval losses dashed with square markers (evaluations are few), in ``eval_colour`` if given."""
    for key, points in series.losses.items():
        eval_loss = key == "eval_loss"
        style = {"ls": "--", "marker": "s", "markersize": 4} if eval_loss else _points(len(points))
        ax.plot(points[:, 0], points[:, 1], color=(eval_colour or colour) if eval_loss else colour,
                label=f"{prefix}{LOSS_LABELS[key]}", **style)


def _orthogonality(series: Series, axes) -> None:
    from matplotlib import colormaps

    residual = np.clip(series.values["ortho_residual_max"], RESIDUAL_FLOOR, None)
    heat, curve = axes
    threshold = series.info.residual_threshold
    # A fixed scale: healthy fp32 rotations (~1e-7) stay dark, anything near the threshold lights up.
    top = max(np.log10(threshold) + 1 if threshold else -3.0,
              float(np.max(np.log10(residual), initial=RESIDUAL_SCALE_BOTTOM, where=np.isfinite(residual))))
    # Below the scale (exactly orthogonal R at θ = 0, clipped to 1e-12) is a colour of its own, not black.
    cmap = colormaps["magma"].with_extremes(under="tab:cyan", bad="lightgrey")
    mesh = heat.pcolormesh(
        _cell_edges(series.steps), np.arange(residual.shape[1] + 1) - 0.5, np.log10(residual.T),
        cmap=cmap, vmin=RESIDUAL_SCALE_BOTTOM, vmax=top,
    )
    heat.figure.colorbar(mesh, ax=list(axes), extend="min", fraction=0.04, pad=0.01,
                         label=f"log10 max ‖RᵀR − I‖_F (cyan: < 1e{RESIDUAL_SCALE_BOTTOM:.0f}, e.g. exactly 0)")
    heat.grid(False)
    rows = residual.shape[1]
    shown = range(0, rows, math.ceil(rows / MAX_LAYER_TICKS))
    labels = _layer_labels(series)
    heat.set_yticks(list(shown), [labels[row] for row in shown])
    heat.set_ylabel("gated layer")
    heat.set_title("Orthogonality residual per layer (max over blocks)")
    curve.semilogy(series.steps, _over_columns(residual)[2], color="black", marker=".", label="max over layers")
    if threshold is not None:
        curve.axhline(threshold, color="red", ls="--", label="alert threshold")
    curve.set_ylabel("‖RᵀR − I‖_F")
    _legend_outside(curve)


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Heatmap column edges halfway between samples (the steps need not be evenly spaced)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _gate(series: Series, axes) -> None:
    (ax,) = axes
    _layer_lines(ax, series, series.values["gate"], _layer_labels(series), lw=1.5)
    _annealing_landmarks(ax, series)
    ax.set_ylabel("σ(α)")
    ax.set_title("Gate activation σ(α) per layer")
    _legend_outside(ax)


def _annealing_landmarks(ax, series: Series) -> None:
    """The end of warmup and the target σ(α), named in the legend (text on the axes would collide)."""
    info = series.info
    if info.warmup_steps:
        ax.axvline(info.warmup_steps, color="grey", ls="--", lw=1, label=f"end of warmup (step {info.warmup_steps})")
    if info.gate_target is not None:
        ax.axhline(info.gate_target, color="red", ls=":", lw=1.5, label=f"target σ(α) = {info.gate_target:.3g}")


def _logits(series: Series, axes) -> None:
    (ax,) = axes
    steps, values = series.steps, series.values
    mean, std = values["logit_mean"], values["logit_std"]
    points = _points(len(series))
    ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.25, label="mean ± std")
    if points:  # a band over one step has no width
        ax.errorbar(steps, mean, yerr=std, fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3)
    ax.plot(steps, mean, color="tab:blue", label="mean", **points)
    ax.plot(steps, values["logit_min"], color="grey", ls="--", lw=1, label="min", **points)
    ax.plot(steps, values["logit_max"], color="grey", ls="-.", lw=1, label="max", **points)
    bad = values["logit_nonfinite"] > 0
    if bad.any():
        for step in steps[bad]:
            ax.axvline(step, color="red", alpha=0.4, lw=1)
        ax.plot([], [], color="red", label="non-finite logits")
    ax.set_ylabel("logit")
    ax.set_title("Output logits")
    _legend_outside(ax)


def _predictions(series: Series, axes) -> None:
    entropy_ax, accuracy_ax = axes
    steps, values = series.steps, series.values
    points = _points(len(series))
    entropy_ax.plot(steps, values["entropy"], color="tab:purple", label="mean entropy", **points)
    entropy_ax.set_ylabel("nats")
    entropy_ax.set_title("Entropy of the predicted distribution (mean over predicted tokens)")
    _legend_outside(entropy_ax)
    accuracy_ax.plot(steps, values["top1_accuracy"], color="tab:green", label="top-1 accuracy", **points)
    accuracy_ax.set_ylim(-0.02, 1.02)
    accuracy_ax.set_ylabel("fraction")
    accuracy_ax.set_title("Top-1 accuracy (label has the largest logit)")
    _legend_outside(accuracy_ax)


def _activations(series: Series, axes) -> None:
    rms, peak = axes
    labels = _layer_labels(series)
    _layer_lines(rms, series, series.values["act_rms"], labels)
    rms.set_ylabel("rms")
    where = "gate output" if series.info.gated else "decoder layer output (no gates)"
    rms.set_title(f"Activations per layer: {where}")
    _layer_lines(peak, series, series.values["act_max_abs"], labels)
    peak.set_ylabel("max |y|")
    for ax in axes:
        if len(labels) <= MAX_LEGEND_ENTRIES:
            _legend_outside(ax)


def _gradients(series: Series, axes) -> None:
    labels = _layer_labels(series)
    panels = [("grad_lora", list(series.info.lora_groups))]
    if series.info.gated:
        panels = [("grad_theta", labels), ("grad_alpha", labels)] + panels
    for ax, (name, names) in zip(axes, panels):
        values = series.values[name]
        ax.set_yscale("log")
        _layer_lines(ax, series, np.where(values > 0, values, np.nan), names,
                     "LoRA group" if name == "grad_lora" else "decoder layer")
        zero_rows, _ = np.nonzero(values == 0)
        if len(zero_rows):
            ax.plot(series.steps[zero_rows], np.full(len(zero_rows), 0.02), "x", color="red",
                    transform=ax.get_xaxis_transform(), label="exactly zero")
        if ax.get_legend_handles_labels()[0]:
            _legend_outside(ax)
        ax.set_ylabel(METRIC[name].label)
        if not names:
            ax.text(0.5, 0.5, "no parameters", transform=ax.transAxes, ha="center")
        elif np.isnan(values).all():  # e.g. α throughout a run shorter than its warmup
            ax.text(0.5, 0.5, "frozen at every sample (no gradient)", transform=ax.transAxes, ha="center")
    axes[0].set_title("Gradient norms (as the optimizer sees them; gaps: frozen)")


# -- several runs on the same axes ----------------------------------------------------------------
def build_comparison_figures(runs: list[tuple[str, Series]]) -> list[tuple[str, object]]:
    """Per run one colour; per-layer metrics as the mean over layers (line) and their range (band)."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    coloured = [(name, _plottable(series), colours[i % len(colours)]) for i, (name, series) in enumerate(runs)]
    gated = [(name, series, colour) for name, series, colour in coloured if series.info.gated]
    plots = []
    if any(series.losses for _, series, _ in coloured):
        plots.append(("loss", 1, lambda axes: _compare_loss(axes, coloured)))
    plots.append(("logits", 1, lambda axes: _compare_logits(axes, coloured)))
    plots.append(("activations", 2, lambda axes: _compare_layers(
        axes, coloured, ("act_rms", "act_max_abs"), "Activations (line: mean over layers, band: their range)")))
    plots.append(("gradients", 1, lambda axes: _compare_layers(
        axes, coloured, ("grad_lora",), "LoRA gradient norms (line: mean over groups, band: their range)", log=True)))
    if gated:
        plots.append(("gates", 3, lambda axes: _compare_layers(
            axes, gated, ("gate", "theta_norm_max", "ortho_residual_max"),
            "Gates, in the gated runs only (line: mean over layers, band: their range)", log_last=True)))
    figures = []
    for name, rows, draw in plots:
        figure, axes = _figure(rows)
        draw(axes)
        for ax in axes:
            _legend_outside(ax)
        figures.append((name, figure))
    return figures


def _compare_loss(axes, runs) -> None:
    (ax,) = axes
    for name, series, colour in runs:
        _loss_lines(ax, series, colour, f"{name}: ")
    ax.set_ylabel("loss")
    ax.set_title("Loss (as the Trainer logged it)")


def _compare_logits(axes, runs) -> None:
    (ax,) = axes
    for name, series, colour in runs:
        values, points = series.values, _points(len(series))
        mean, std = values["logit_mean"], values["logit_std"]
        ax.fill_between(series.steps, mean - std, mean + std, color=colour, alpha=0.2)
        ax.plot(series.steps, mean, color=colour, label=f"{name}: mean (band ± std)", **points)
        ax.plot(series.steps, values["logit_max"], color=colour, ls="-.", lw=1, label=f"{name}: max", **points)
        ax.plot(series.steps, values["logit_min"], color=colour, ls="--", lw=1, label=f"{name}: min", **points)
    ax.set_ylabel("logit")
    ax.set_title("Output logits")


def _compare_layers(axes, runs, names, title, log=False, log_last=False) -> None:
    for row, (ax, name) in enumerate(zip(axes, names)):
        logarithmic = log or (log_last and row == len(names) - 1)
        if logarithmic:
            ax.set_yscale("log")
        for run_name, series, colour in runs:
            values = series.values[name].astype(np.float64)
            mean, low, high = _over_columns(np.where(values > 0, values, np.nan) if logarithmic else values)
            ax.fill_between(series.steps, low, high, color=colour, alpha=0.2)
            ax.plot(series.steps, mean, color=colour, label=run_name, **_points(len(series)))
        ax.set_ylabel(METRIC[name].label)
    axes[0].set_title(title)


def _over_columns(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max per row over its finite entries; NaN for a row without any (no warnings)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=1)
    some = count > 0
    mean = np.where(some, np.where(finite, values, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    low = np.where(some, np.where(finite, values, np.inf).min(axis=1, initial=np.inf), np.nan)
    high = np.where(some, np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf), np.nan)
    return mean, low, high
