"""The monitor's PNGs, drawn from a Series with matplotlib's object API (no pyplot: no global state, no
GUI backend, safe off the main thread).

- orthogonality.png: residual max per layer × step (heatmap, log10) and its max over layers (log scale).
- gate.png: σ(α) per layer vs step, with the end of warmup and the target σ(α).
- logits.png: mean ± std band with min and max; non-finite logits marked.
- activations.png: rms and max |y| of the gate output per layer.
- gradients.png: gradient norms of θ and α per layer and of the LoRA groups (log scale; exact zeros
  marked, since they vanish on a log axis and are what the dead-gradient alert is about).
"""

import threading
from pathlib import Path

import numpy as np

from .export import partial_name
from .series import Series

RESIDUAL_FLOOR = 1e-12  # log scale: an exactly orthogonal fp32 R has residual 0
MAX_LEGEND_ENTRIES = 10
# matplotlib's text rendering (FreeType) is not thread-safe: one monitor figure at a time per process.
_DRAWING = threading.Lock()


def draw_plots(series: Series, directory: Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not len(series):
        return []
    with _DRAWING:
        return _draw_all(series, directory)


def _draw_all(series: Series, directory: Path) -> list[Path]:
    from matplotlib.figure import Figure

    drawn = []
    for name, draw, rows in (
        ("orthogonality", _orthogonality, 2),
        ("gate", _gate, 1),
        ("logits", _logits, 1),
        ("activations", _activations, 2),
        ("gradients", _gradients, 3),
    ):
        figure = Figure(figsize=(10, 3.2 * rows + 0.6))
        axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
        for ax in axes:
            ax.grid(True, alpha=0.3)
        draw(series, axes)
        axes[-1].set_xlabel("optimizer step")
        path = directory / f"{name}.png"
        partial = directory / partial_name(f"{name}.png")
        figure.savefig(partial, dpi=100, format="png")
        partial.replace(path)
        drawn.append(path)
    return drawn


def _layer_lines(ax, series: Series, values: np.ndarray, labels: list[str], **style) -> None:
    """One line per layer, coloured shallow (dark) to deep (yellow)."""
    from matplotlib import colormaps

    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(labels), 1)))
    for column, label in enumerate(labels):
        ax.plot(series.steps, values[:, column], color=colours[column], label=label, **style)
    if 0 < len(labels) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize="small", ncol=min(len(labels), 5), loc="best")
    elif labels:
        ax.text(0.01, 0.97, f"{labels[0]} (dark) … {labels[-1]} (yellow)", transform=ax.transAxes, va="top")


def _layer_labels(series: Series) -> list[str]:
    return [f"L{layer}" for layer in series.info.layers]


def _orthogonality(series: Series, axes) -> None:
    residual = np.clip(series.values["ortho_residual_max"], RESIDUAL_FLOOR, None)
    heat, curve = axes
    threshold = series.info.residual_threshold
    # A fixed scale: healthy fp32 rotations (~1e-7) stay dark, anything near the threshold lights up.
    top = max(np.log10(threshold) + 1 if threshold else -3.0, float(np.nanmax(np.log10(residual), initial=-8.0)))
    mesh = heat.pcolormesh(
        _cell_edges(series.steps), np.arange(residual.shape[1] + 1) - 0.5, np.log10(residual.T),
        cmap="magma", vmin=-8.0, vmax=top,
    )
    heat.figure.colorbar(mesh, ax=list(axes), label="log10 max ‖RᵀR − I‖_F", fraction=0.04, pad=0.02)
    heat.grid(False)
    heat.set_yticks(range(residual.shape[1]), _layer_labels(series))
    heat.set_ylabel("gated layer")
    heat.set_title("Orthogonality residual per layer (max over blocks)")
    curve.semilogy(series.steps, np.nanmax(residual, axis=1), color="black", marker=".", label="max over layers")
    if threshold is not None:
        curve.axhline(threshold, color="red", ls="--", label="alert threshold")
    curve.set_ylabel("‖RᵀR − I‖_F")
    curve.legend(fontsize="small", loc="best")


def _cell_edges(steps: np.ndarray) -> np.ndarray:
    """Heatmap column edges halfway between samples (the steps need not be evenly spaced)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _gate(series: Series, axes) -> None:
    (ax,) = axes
    _layer_lines(ax, series, series.values["gate"], _layer_labels(series), lw=1.5)
    info = series.info
    if info.warmup_steps:
        ax.axvline(info.warmup_steps, color="grey", ls="--", lw=1)
        ax.text(info.warmup_steps, 0.02, " end of warmup", transform=ax.get_xaxis_transform(), color="grey")
    if info.gate_target is not None:
        ax.axhline(info.gate_target, color="red", ls=":", lw=1.5)
        ax.text(0.01, info.gate_target, f" target σ(α) = {info.gate_target:.3g}", color="red", va="bottom",
                transform=ax.get_yaxis_transform())
    ax.set_ylabel("σ(α)")
    ax.set_title("Gate activation σ(α) per layer")


def _logits(series: Series, axes) -> None:
    (ax,) = axes
    steps, values = series.steps, series.values
    mean, std = values["logit_mean"], values["logit_std"]
    ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.25, label="mean ± std")
    ax.plot(steps, mean, color="tab:blue", label="mean")
    ax.plot(steps, values["logit_min"], color="grey", ls="--", lw=1, label="min")
    ax.plot(steps, values["logit_max"], color="grey", ls="-.", lw=1, label="max")
    bad = values["logit_nonfinite"] > 0
    if bad.any():
        for step in steps[bad]:
            ax.axvline(step, color="red", alpha=0.4, lw=1)
        ax.plot([], [], color="red", label="non-finite logits")
    ax.set_ylabel("logit")
    ax.set_title("Output logits")
    ax.legend(fontsize="small", loc="best")


def _activations(series: Series, axes) -> None:
    rms, peak = axes
    labels = _layer_labels(series)
    _layer_lines(rms, series, series.values["act_rms"], labels)
    rms.set_ylabel("rms")
    rms.set_title("Gate output activations per layer")
    _layer_lines(peak, series, series.values["act_max_abs"], labels)
    peak.set_ylabel("max |y|")


def _gradients(series: Series, axes) -> None:
    labels = _layer_labels(series)
    panels = (
        ("grad_theta", labels, "‖∂L/∂θ‖"),
        ("grad_alpha", labels, "|∂L/∂α|"),
        ("grad_lora", list(series.info.lora_groups), "LoRA ‖∂L/∂W‖"),
    )
    for ax, (name, names, ylabel) in zip(axes, panels):
        values = series.values[name]
        ax.set_yscale("log")
        _layer_lines(ax, series, np.where(values > 0, values, np.nan), names)
        zero_rows, _ = np.nonzero(values == 0)
        if len(zero_rows):
            ax.plot(series.steps[zero_rows], np.full(len(zero_rows), 0.02), "x", color="red",
                    transform=ax.get_xaxis_transform(), label="exactly zero")
            ax.legend(fontsize="small", loc="best")
        ax.set_ylabel(ylabel)
        if not names:
            ax.text(0.5, 0.5, "no parameters", transform=ax.transAxes, ha="center")
    axes[0].set_title("Gradient norms (as the optimizer sees them; gaps: frozen)")
