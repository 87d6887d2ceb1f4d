"""The monitor's figures looked at as a person would, at 4 and at 30 layers and for a one-sample run: no
text cut off or overlapping, legends off the data, values below the colour scale visible, single points
drawn, the loss plot, a baseline's plots, several runs on the same axes, and runs whose values turned NaN
or infinite drawn without a warning."""

import itertools
import warnings

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import QuadMesh
from matplotlib.legend import Legend
from matplotlib.text import Text

from monitor_helpers import synthetic_sample
from so8t.monitor.losses import Losses
from so8t.monitor.plots import build_comparison_figures, build_figures, draw_comparison, draw_plots
from so8t.monitor.schema import RunInfo
from so8t.monitor.series import Series


def make_series(layers: int, steps, gated: bool = True, losses: bool = True) -> Series:
    info = RunInfo(
        layers=tuple(range(1, layers + 1)), lora_groups=tuple(f"L{i}" for i in range(layers + 2)) + ("other",),
        interval=10, warmup_steps=30 if gated else None, gate_target=0.1 if gated else None,
        residual_threshold=1e-4, gated=gated,
    )
    samples = [synthetic_sample(step, info) for step in steps]
    if gated:
        samples[0]["ortho_residual_max"] = np.zeros(layers)  # θ = 0 at step 1: R = I exactly
    logged = Losses()
    if losses:
        for step in steps:
            logged.add(step, {"loss": 3.0 / step})
        logged.add(steps[-1], {"eval_loss": 1.5})
    return Series.from_samples(info, samples, logged.arrays())


FULL_RUN = [1] + list(range(10, 151, 10))
RUNS = {
    "4 layers": lambda: make_series(4, FULL_RUN),
    "30 layers": lambda: make_series(30, FULL_RUN),
    "one sample": lambda: make_series(4, [1]),
    "30 layers, one sample": lambda: make_series(30, [1]),
    "baseline": lambda: make_series(4, FULL_RUN, gated=False),
}


def rendered(figures):
    for _, figure in figures:
        FigureCanvasAgg(figure).draw()  # the renderer savefig uses, so text sizes are the PNG's
    return figures


def drawn_tick_labels(axis):
    """Tick labels matplotlib draws: those of ticks inside the view (it keeps others around, undrawn)."""
    low, high = sorted(axis.get_view_interval())
    coordinate = 0 if axis.axis_name == "x" else 1
    return [label for label in axis.get_ticklabels(which="both") if label.get_visible() and label.get_text()
            and low - 1e-9 <= label.get_position()[coordinate] <= high + 1e-9]


def visible_texts(figure):
    """Every text drawn: titles, axis labels, legends, colour bar labels and the drawn tick labels."""
    tick_labels = {id(label) for ax in figure.axes for axis in (ax.xaxis, ax.yaxis) for label in axis.get_ticklabels(which="both")}
    texts = [t for t in figure.findobj(Text) if id(t) not in tick_labels and t.get_visible() and t.get_text().strip()]
    return texts + [label for ax in figure.axes for axis in (ax.xaxis, ax.yaxis) for label in drawn_tick_labels(axis)]


def overlap(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_text_is_inside_the_image_and_nothing_overlaps(run):
    for name, figure in rendered(build_figures(RUNS[run]())):
        renderer = figure.canvas.get_renderer()
        frame = figure.bbox
        for text in visible_texts(figure):
            box = text.get_window_extent(renderer)
            inside = box.x0 >= -1 and box.y0 >= -1 and box.x1 <= frame.x1 + 1 and box.y1 <= frame.y1 + 1
            assert inside, f"{name}: {text.get_text()!r} is cut off at {box}"
        for ax in figure.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = [t.get_window_extent(renderer) for t in drawn_tick_labels(axis)]
                for a, b in itertools.combinations(labels, 2):
                    assert not overlap(a, b), f"{name}: tick labels overlap"
        legends = [legend.get_window_extent(renderer) for legend in figure.findobj(Legend)]
        for legend in legends:  # beside the axes, never over a curve, a landmark's text or the frame
            for ax in figure.axes:
                assert not overlap(legend, ax.get_window_extent(renderer)), f"{name}: legend over an axes"


def test_the_gate_plot_names_the_target_and_the_end_of_warmup_in_its_legend():
    figures = dict(build_figures(make_series(4, FULL_RUN)))
    (ax,) = figures["gate"].axes
    labels = ax.get_legend_handles_labels()[1]
    assert "target σ(α) = 0.1" in labels and "end of warmup (step 30)" in labels
    assert not ax.texts


def test_residuals_below_the_colour_scale_have_a_colour_of_their_own():
    figures = dict(build_figures(make_series(30, FULL_RUN)))
    (mesh,) = [c for c in figures["orthogonality"].axes[0].collections if isinstance(c, QuadMesh)]
    lowest_on_scale = mesh.to_rgba(np.array([mesh.norm.vmin]))[0]
    exactly_orthogonal = mesh.to_rgba(np.log10(np.array([1e-12])))[0]
    assert not np.allclose(exactly_orthogonal, lowest_on_scale)
    assert exactly_orthogonal[:3].sum() > 0.5  # not black
    (bar,) = [ax for ax in figures["orthogonality"].axes if ax.get_label() == "<colorbar>"]
    assert "< 1e-8" in bar.get_ylabel()


def test_a_single_sample_is_drawn_as_markers():
    for name, figure in build_figures(make_series(4, [1])):
        lines = [line for ax in figure.axes for line in ax.get_lines() if len(line.get_xdata()) == 1
                 and np.isfinite(np.asarray(line.get_ydata(), dtype=float)).all()]
        assert lines, name
        for line in lines:
            assert line.get_marker() not in (None, "None", ""), f"{name}: {line.get_label()} is invisible"


def test_the_loss_plot_has_the_training_and_eval_loss():
    series = make_series(4, FULL_RUN)
    (ax,) = dict(build_figures(series))["loss"].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["training loss"].get_xdata(), FULL_RUN)
    np.testing.assert_allclose(lines["training loss"].get_ydata(), [3.0 / s for s in FULL_RUN])
    assert list(lines["eval loss"].get_xdata()) == [150] and list(lines["eval loss"].get_ydata()) == [1.5]
    assert "loss" not in dict(build_figures(make_series(4, FULL_RUN, losses=False)))


def test_a_baseline_has_no_gate_plots_and_says_where_it_measured():
    figures = dict(build_figures(make_series(4, FULL_RUN, gated=False)))
    assert sorted(figures) == ["activations", "gradients", "logits", "loss"]
    assert [ax.get_ylabel() for ax in figures["gradients"].axes if ax.get_label() != "<colorbar>"] == ["LoRA ‖∂L/∂W‖"]
    assert "decoder layer output" in figures["activations"].axes[0].get_title()


def test_runs_are_compared_on_the_same_axes(tmp_path):
    gated, baseline = make_series(4, FULL_RUN), make_series(4, FULL_RUN[:8], gated=False)
    figures = dict(rendered(build_comparison_figures([("gated", gated), ("baseline", baseline)])))
    assert sorted(figures) == ["activations", "gates", "gradients", "logits", "loss"]
    for name in ("activations", "gradients", "logits", "loss"):
        for ax in figures[name].axes:
            labels = " ".join(ax.get_legend_handles_labels()[1])
            assert "gated" in labels and "baseline" in labels, name
    for ax in figures["gates"].axes:  # the gated run only
        assert ax.get_legend_handles_labels()[1] == ["gated"]
    (rms, _) = figures["activations"].axes
    mean_line = next(line for line in rms.get_lines() if line.get_label() == "baseline")
    np.testing.assert_allclose(mean_line.get_ydata(), baseline.values["act_rms"].mean(axis=1))
    written = draw_comparison([("gated", gated), ("baseline", baseline)], tmp_path / "compare")
    assert sorted(path.name for path in written) == [f"{name}.png" for name in sorted(figures)]


def test_a_gradient_frozen_at_every_sample_says_so_instead_of_an_empty_panel():
    figures = dict(build_figures(make_series(4, [1, 10, 20])))  # all within the 30-step warmup: α frozen
    _, alpha_panel, _ = [ax for ax in figures["gradients"].axes if ax.get_label() != "<colorbar>"]
    assert [text.get_text() for text in alpha_panel.texts] == ["frozen at every sample (no gradient)"]


def diverged_series(how: str, gated: bool = True) -> Series:
    """A run whose values turn non-finite: ``nan`` from the start, ``inf`` from the start (±inf, alternating
    by step), or ``diverged``: healthy for a few samples, then NaN with infinities mixed in."""
    series = make_series(4, FULL_RUN, gated=gated)
    for name, values in series.values.items():
        if how == "nan":
            values[:] = np.nan
        elif how == "inf":
            values[:] = np.where(np.arange(len(values)) % 2 == 0, np.inf, -np.inf).reshape((-1,) + (1,) * (values.ndim - 1))
        else:
            values[5:] = np.nan
            values[7::3] = np.inf
            values[8::3] = -np.inf
    return series  # the losses stay finite: the Trainer's non-finite losses are never recorded


@pytest.mark.parametrize(("how", "gated"), [("nan", True), ("inf", True), ("diverged", True), ("diverged", False)])
def test_non_finite_series_draw_without_a_warning(how, gated, tmp_path):
    series = diverged_series(how, gated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice", matplotlib's "cannot be log-scaled", ...
        written = draw_plots(series, tmp_path / "plots")
        written += draw_comparison([("diverged", series), ("healthy", make_series(4, FULL_RUN))], tmp_path / "compare")
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)
    assert len(written) == len(build_figures(series)) + 5
