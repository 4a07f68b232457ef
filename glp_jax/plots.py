"""Scaling plots as PNG: loss vs compute with the fitted law (the paper's Figure 2a), loss vs
activations seen, and downstream metrics vs compute and vs loss.

Every function takes the runs from `scaling.load_runs`, the dict from `scaling.fit_runs` /
`fit_sweep` (or that dict read back from JSON) and an output path, and returns the path.
Figures are drawn on the Agg canvas directly, so importing this module never changes the
pyplot backend of the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from glp_jax import scaling
from glp_jax.errors import GLPError

DPI = 150
FIGSIZE = (7.5, 5.0)
COLORMAP = "viridis"
COMPUTE_LABEL = "Compute C = 6·N·D (FLOPs)"
ACTIVATIONS_LABEL = "Activations seen D"
FRONTIER_STYLE = {"marker": "o", "s": 46, "facecolors": "none", "edgecolors": "crimson",
                  "linewidths": 1.4, "zorder": 4}
FIT_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.6, "zorder": 5}
METRIC_LABELS = {
    "fd": "Fréchet distance (lower is better)",
    "probe_auc": "1-D probe AUC (meta-neurons)",
    "dense_probe_auc": "Dense probe AUC",
    "steer_score": "Steering score (concept & fluency)",
    "delta_lm_loss": "Delta LM loss (nats)",
}


def plot_loss_vs_compute(runs: Sequence[scaling.Run], result: dict, path: str | Path, *,
                         log_y: bool = True) -> Path:
    """Loss curves over compute, one colour per depth, frontier points and the fitted law."""
    fig, ax = _new_figure()
    colors = depth_colors(runs)
    for run, curve in _loss_curves(runs, result):
        ax.plot(curve.compute, curve.value, marker=".", markersize=3, linewidth=1.2,
                color=colors[_depth_key(run)], alpha=0.9)
    points = result["frontier"]["points"]
    ax.scatter([p["compute"] for p in points], [p["loss"] for p in points],
               label=f"compute-efficient frontier ({len(points)} fitted points)", **FRONTIER_STYLE)
    fit = result["loss_fit"]
    grid = _log_grid([p["compute"] for p in points])
    ax.plot(grid, scaling.PowerLawFit.from_dict(fit).predict(grid), label=_loss_law_label(fit),
            **FIT_STYLE)
    ax.set_xscale("log")
    if log_y:
        _log_y_with_plain_ticks(ax)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(_loss_axis_label(result))
    ax.set_title("GLP loss vs compute")
    _depth_legend(ax, runs, colors, loc="lower left")
    return _save(fig, path)


def plot_loss_vs_activations(runs: Sequence[scaling.Run], result: dict, path: str | Path, *,
                             log_y: bool = True) -> Path:
    """Loss over activations seen, one colour per depth, frontier points ringed."""
    fig, ax = _new_figure()
    colors = depth_colors(runs)
    for run, curve in _loss_curves(runs, result):
        seen = run.column("activations_seen")[curve.rows]
        ax.plot(seen, curve.value, marker=".", markersize=3, linewidth=1.2,
                color=colors[_depth_key(run)], alpha=0.9)
    points = [p for p in result["frontier"]["points"] if p["activations_seen"] is not None]
    ax.scatter([p["activations_seen"] for p in points], [p["loss"] for p in points],
               label="compute-efficient frontier", **FRONTIER_STYLE)
    ax.set_xscale("log")
    if log_y:
        _log_y_with_plain_ticks(ax)
    ax.set_xlabel(ACTIVATIONS_LABEL)
    ax.set_ylabel(_loss_axis_label(result))
    ax.set_title("GLP loss vs activations seen")
    _depth_legend(ax, runs, colors, loc="lower left")
    return _save(fig, path)


def plot_metric_vs_compute(runs: Sequence[scaling.Run], result: dict, metric: str,
                           path: str | Path) -> Path:
    """A downstream metric over compute per depth, the points fitted and the fitted law."""
    fit = _downstream(result, metric)["vs_compute"]
    fig, ax = _new_figure()
    colors = depth_colors(runs)
    for run in runs:
        curve = _metric_curve(run, result, metric)
        ax.plot(curve.compute, curve.value, marker="o", markersize=4, linewidth=1.0,
                color=colors[_depth_key(run)], alpha=0.9)
    if "skipped" in fit:
        ax.set_title(f"{_metric_label(metric)} vs compute\n(not fitted: too few frontier points)")
    else:
        ax.scatter(fit["x"], fit["y"], label=f"on the loss frontier ({fit['n_points']} fitted)",
                   **FRONTIER_STYLE)
        grid = _log_grid(fit["x"])
        ax.plot(grid, scaling.SaturatingFit.from_dict(fit).predict(grid),
                label=_saturating_label(fit, metric), **FIT_STYLE)
        ax.set_title(f"{_metric_label(metric)} vs compute")
    ax.set_xscale("log")
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(_metric_label(metric))
    _depth_legend(ax, runs, colors)
    return _save(fig, path)


def plot_metric_vs_loss(runs: Sequence[scaling.Run], result: dict, metric: str,
                        path: str | Path) -> Path:
    """A downstream metric against the run's loss at the same compute, with the linear fit."""
    fit = _downstream(result, metric)["vs_loss"]
    fig, ax = _new_figure()
    colors = depth_colors(runs)
    for run, loss_curve in _loss_curves(runs, result, keep_empty=True):
        loss, value = scaling.metric_vs_loss(run, loss_curve, _metric_curve(run, result, metric))
        ax.scatter(loss, value, s=22, color=colors[_depth_key(run)], alpha=0.9, zorder=3)
    if "skipped" in fit:
        ax.set_title(f"{_metric_label(metric)} vs loss\n(not fitted: too few points)")
    else:
        grid = np.linspace(min(fit["x"]), max(fit["x"]), 50)
        ax.plot(grid, scaling.LinearFit.from_dict(fit).predict(grid),
                label=_linear_label(fit, metric), **FIT_STYLE)
        ax.set_title(f"{_metric_label(metric)} vs loss")
    ax.set_xlabel(_loss_axis_label(result))
    ax.set_ylabel(_metric_label(metric))
    _depth_legend(ax, runs, colors, line=False)
    return _save(fig, path)


def plot_sweep(runs: Sequence[scaling.Run], result: dict, out_dir: str | Path) -> list[Path]:
    """Every plot of a fitted sweep into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    paths = [plot_loss_vs_compute(runs, result, out_dir / "loss_vs_compute.png"),
             plot_loss_vs_activations(runs, result, out_dir / "loss_vs_activations.png")]
    for metric in result.get("downstream", {}):
        paths.append(plot_metric_vs_compute(runs, result, metric, out_dir / f"{metric}_vs_compute.png"))
        paths.append(plot_metric_vs_loss(runs, result, metric, out_dir / f"{metric}_vs_loss.png"))
    return paths


def depth_colors(runs: Sequence[scaling.Run]) -> dict:
    """One colour per depth (or per size when depth is unknown), shallow = dark."""
    keys = sorted({_depth_key(r) for r in runs})
    cmap = colormaps[COLORMAP]
    # Stop short of viridis' pale yellow end, which vanishes on white.
    shades = np.linspace(0.0, 0.85, len(keys)) if len(keys) > 1 else [0.35]
    return {key: cmap(shade) for key, shade in zip(keys, shades, strict=True)}


def _depth_key(run: scaling.Run) -> tuple:
    return (run.n_layers if run.n_layers is not None else float("inf"),
            run.params if run.params is not None else float("inf"))


def _depth_legend(ax, runs: Sequence[scaling.Run], colors: dict, *, loc: str = "best",
                  line: bool = True) -> None:
    """Legend with one entry per depth (seeds share it), then the fit/frontier entries."""
    extra = ax.get_legend_handles_labels()[0]
    seen = {}
    for run in sorted(runs, key=_depth_key):
        seen.setdefault(_depth_key(run), run)
    handles = [ax.plot([], [], color=colors[key], marker="o" if not line else ".",
                       linestyle="-" if line else "none", linewidth=1.5,
                       label=_depth_label(run))[0] for key, run in seen.items()]
    ax.legend(handles=handles + extra, fontsize=8.5, framealpha=0.9, loc=loc)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def _depth_label(run: scaling.Run) -> str:
    parts = [f"depth {run.n_layers}" if run.n_layers is not None else run.name]
    if run.params is not None:
        parts.append(f"{scaling.format_count(run.params)} params")
    return ", ".join(parts)


def _loss_curves(runs, result: dict, keep_empty: bool = False):
    """(run, loss curve) pairs with the loss column and filters the fit used."""
    pairs = []
    for run in runs:
        curve = scaling.run_curve(run, result["loss_column"],
                                  compute_column=result["compute_column"],
                                  min_activations=result["min_activations"], positive=True)
        if len(curve) or keep_empty:
            pairs.append((run, curve))
    return pairs


def _metric_curve(run: scaling.Run, result: dict, metric: str) -> scaling.Curve:
    return scaling.metric_curve(run, metric, compute_column=result["compute_column"],
                                min_activations=result["min_activations"],
                                final_only=result["final_only"])


def _downstream(result: dict, metric: str) -> dict:
    downstream = result.get("downstream", {})
    if metric not in downstream:
        raise GLPError(f"no fit for metric {metric!r} in the result (fitted: "
                       f"{sorted(downstream)}); pass metrics=[...] to fit_runs")
    return downstream[metric]


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _log_y_with_plain_ticks(ax) -> None:
    """Log y axis; when it spans little more than a decade (loss curves usually do), label
    plain numbers (0.8, 1.2) instead of matplotlib's sparse 8x10^-1 ticks."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo > 30:
        return
    ticks = MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(ticks[(ticks >= lo) & (ticks <= hi) & (ticks > 0)]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _loss_axis_label(result: dict) -> str:
    name = {"val_loss": "Validation loss", "loss": "Training loss"}.get(
        result["loss_column"], result["loss_column"])
    return f"{name} (flow-matching MSE)"


def _log_grid(values: Sequence[float], n: int = 200) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.logspace(np.log10(values.min()), np.log10(values.max()), n)


def _math_number(value: float) -> str:
    """A number for mathtext: 0.52, 435.1, 3.92\\times10^{6}."""
    text = scaling.format_number(value)
    if "e" in text:
        mantissa, exponent = text.split("e")
        return rf"{mantissa}\times10^{{{exponent}}}"
    return text


def _loss_law_label(fit: dict) -> str:
    return (rf"fit: $L = {_math_number(fit['E'])} + {_math_number(fit['A'])}"
            rf"\,C^{{-{_math_number(fit['alpha'])}}}$")


def _saturating_label(fit: dict, metric: str) -> str:
    sign = "-" if fit["increasing"] else "+"
    return (rf"fit: $f = {_math_number(fit['a'])} {sign} {_math_number(fit['b'])}"
            rf"\,C^{{-{_math_number(fit['beta'])}}}$")


def _linear_label(fit: dict, metric: str) -> str:
    sign = "-" if fit["slope"] < 0 else "+"
    return (rf"fit: $f = {_math_number(fit['intercept'])} {sign} "
            rf"{_math_number(abs(fit['slope']))}\,L$")


def _new_figure():
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
