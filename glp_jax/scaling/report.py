"""A sweep's fits as one JSON-able result, and its two files: scaling.json and scaling.md."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glp_jax import rundir
from glp_jax.errors import GLPError
from glp_jax.scaling.fits import fit_downstream_vs_compute, fit_linear_vs_loss, fit_power_law
from glp_jax.scaling.formatting import format_count, format_number
from glp_jax.scaling.frontier import (
    Curve,
    Frontier,
    FrontierPoint,
    frontier,
    metric_curve,
    metric_vs_loss,
    run_curve,
)
from glp_jax.scaling.runs import (
    COMPUTE_6ND,
    Run,
    as_float,
    default_loss_column,
    load_runs,
    metric_columns,
)

RESULTS_JSON = "scaling.json"
RESULTS_MD = "scaling.md"


def fit_runs(runs: Sequence[Run], *, loss_column: str | None = None,
             compute_column: str = COMPUTE_6ND, final_only: bool = False,
             min_activations: float = 0.0, metrics: Sequence[str] | None = None,
             metric_points: str = "loss_frontier", n_boot: int = 1000, seed: int = 0,
             huber_delta: float = 1e-3, loss_huber_delta: float | None = None,
             n_grid: int = 256) -> dict:
    """Frontier, loss law and downstream fits of a sweep, as a JSON-able dict.

    Every fit is told the run each of its points comes from, so its bootstrap resamples
    runs: points of one run share its deviation from the law. The loss law is least
    squares on log L (`loss_huber_delta` makes it Huber); `huber_delta` is the downstream
    fits' Huber threshold, in the metric's units.

    Downstream vs compute uses, by default, the metric points logged by whichever run is
    compute-efficient (on the loss frontier) at that compute (`metric_points="all"` uses
    every point). Downstream vs loss pairs each metric point with its run's loss at the same
    compute (log-log interpolation, never extrapolated).
    """
    if not runs:
        raise GLPError("no runs to fit; load a sweep with load_runs(sweep_dir) first")
    if metric_points not in ("loss_frontier", "all"):
        raise GLPError(f"metric_points={metric_points!r}; use 'loss_frontier' or 'all'")
    loss_column = loss_column or default_loss_column(runs)
    curves = [run_curve(r, loss_column, compute_column=compute_column,
                        min_activations=min_activations, positive=True) for r in runs]
    if not any(len(c) for c in curves):
        raise GLPError(f"no run logs a positive '{loss_column}' with activations_seen > "
                       f"{min_activations}; pass loss_column= one of the logged columns")
    env = frontier(curves, final_only=final_only, n_grid=n_grid)
    used = list(env.points)
    loss_fit = fit_power_law([p.compute for p in used], [p.loss for p in used],
                             groups=[p.name for p in used], huber_delta=loss_huber_delta,
                             n_boot=n_boot, seed=seed)
    result = {
        "method": ("final points, one run per budget" if final_only
                   else "lower envelope of intermediate checkpoints (paper)"),
        "final_only": final_only,
        "loss_column": loss_column,
        "compute_column": compute_column,
        "min_activations": min_activations,
        "n_points_logged": int(sum(len(c) for c in curves)),
        "note": ("fits use only the frontier points listed; intermediate checkpoints of a cosine "
                 "run are not compute-optimal for their budget" if not final_only else
                 "fits use only the frontier points listed (final point of each run)"),
        "runs": [_run_summary(r, c) for r, c in zip(runs, curves, strict=True)],
        "frontier": {
            "points": [_point_summary(runs, curves, p) for p in used],
            "switches": [{"compute": s.compute,
                          "before": runs[s.before].name if s.before >= 0 else None,
                          "after": runs[s.after].name if s.after >= 0 else None}
                         for s in env.switches],
        },
        "loss_fit": loss_fit.to_dict(),
        "downstream": {},
    }
    for metric in metrics if metrics is not None else metric_columns(runs):
        result["downstream"][metric] = _fit_metric(
            runs, curves, env, metric, compute_column=compute_column,
            min_activations=min_activations, final_only=final_only, metric_points=metric_points,
            n_boot=n_boot, seed=seed, huber_delta=huber_delta)
    return _jsonable(result)


def fit_sweep(sweep_dir: str | Path, **kwargs) -> dict:
    """`fit_runs(load_runs(sweep_dir), **kwargs)`, recording the folder."""
    return {"sweep_dir": str(sweep_dir), **fit_runs(load_runs(sweep_dir), **kwargs)}


def write_results(sweep_dir: str | Path, result: dict) -> tuple[Path, Path]:
    """Write `result` as scaling.json and its `results_markdown` as scaling.md in `sweep_dir`.

    Each file is written next to its final name and renamed over it, so a reader (or a
    killed writer) never sees a half-written file.
    """
    sweep_dir = Path(sweep_dir)
    json_path = rundir.write_results(sweep_dir, RESULTS_JSON[:-5], result, results_markdown(result))
    return json_path, sweep_dir / RESULTS_MD


def read_results(sweep_dir: str | Path) -> dict:
    """The result that `write_results` wrote to `sweep_dir`."""
    path = Path(sweep_dir) / RESULTS_JSON
    if not path.is_file():
        raise GLPError(f"no {RESULTS_JSON} in {sweep_dir}; run `glp fit {sweep_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GLPError(f"{path} is not valid JSON ({e}); delete it and run `glp fit` "
                       "again") from e



def _fit_metric(runs, loss_curves, env: Frontier, metric: str, *, compute_column, min_activations,
                final_only, metric_points, n_boot, seed, huber_delta) -> dict:
    x_c, y_c, g_c, x_l, y_l, g_l = [], [], [], [], [], []
    for i, run in enumerate(runs):
        curve = metric_curve(run, metric, compute_column=compute_column,
                             min_activations=min_activations, final_only=final_only)
        if not len(curve):
            continue
        take = (env.curve_at(curve.compute) == i if metric_points == "loss_frontier"
                else np.ones(len(curve), bool))
        x_c.extend(curve.compute[take])
        y_c.extend(curve.value[take])
        g_c.extend([run.name] * int(take.sum()))
        loss, value = metric_vs_loss(run, loss_curves[i], curve)
        x_l.extend(loss)
        y_l.extend(value)
        g_l.extend([run.name] * len(loss))
    out: dict = {}
    try:
        fit = fit_downstream_vs_compute(x_c, y_c, groups=g_c, huber_delta=huber_delta,
                                        n_boot=n_boot, seed=seed)
        out["vs_compute"] = fit.to_dict() | {"formula": fit.formula(y=metric)}
    except GLPError as e:
        out["vs_compute"] = {"skipped": str(e), "n_points": len(x_c)}
    try:
        fit = fit_linear_vs_loss(x_l, y_l, groups=g_l, n_boot=n_boot, seed=seed)
        out["vs_loss"] = fit.to_dict() | {"formula": fit.formula(y=metric)}
    except GLPError as e:
        out["vs_loss"] = {"skipped": str(e), "n_points": len(x_l)}
    return out


def _run_summary(run: Run, curve: Curve) -> dict:
    seen = run.column("activations_seen")
    seen = seen[np.isfinite(seen)]
    return {
        "name": run.name, "label": run.label, "n_layers": run.n_layers, "d_model": run.d_model,
        "params": run.params, "seed": run.seed, "num_activations": run.num_activations,
        "final_activations": float(seen.max()) if len(seen) else None,
        "final_compute": float(curve.compute[-1]) if len(curve) else None,
        "final_loss": float(curve.value[-1]) if len(curve) else None,
        "n_points": len(curve),
    }


def _point_summary(runs: Sequence[Run], curves: Sequence[Curve], point: FrontierPoint) -> dict:
    row = runs[point.curve].rows[point.row]
    return {"run": point.name, "step": as_float(row.get("step")),
            "activations_seen": as_float(row.get("activations_seen")),
            "compute": point.compute, "loss": point.loss}


def _jsonable(value: Any) -> Any:
    """Plain Python containers and numbers; NaN/Inf become None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _interval_text(fit: dict, name: str) -> str:
    interval = fit.get("intervals", {}).get(name)
    return "—" if not interval else f"[{format_number(interval[0])}, {format_number(interval[1])}]"


def _bootstrap_text(bootstrap: Mapping) -> str:
    if not bootstrap["n_resamples"]:
        return f"no bootstrap: {bootstrap['n_groups']} run(s) are too few to resample"
    unit = ("whole runs resampled" if bootstrap["unit"] == "run"
            else "points resampled as if independent")
    return (f"bootstrap over {bootstrap['n_groups']} {bootstrap['unit']}s, {unit}, "
            f"{bootstrap['n_failed']} of {bootstrap['n_resamples']} refits failed")


def _loss_law_intervals_text(fit: Mapping) -> str:
    """How the loss law's intervals were made, in one sentence."""
    profile = fit.get("profile")
    if not fit.get("intervals"):
        return "No intervals (n_boot = 0)."
    parts = []
    if profile:
        ratio = profile["variance_ratio"]
        parts.append(f"the profile likelihood over E (F(1, {profile['dof']}) cutoff"
                     + (f", variance ratio {ratio:.3g} for points correlated within a run"
                        if ratio > 1 else "") + ")")
    if fit.get("bootstrap"):
        parts.append(_bootstrap_text(fit["bootstrap"]))
    return ("Intervals: the union of " + " and ".join(parts) + "; alpha's and A's cover the "
            "best fit at every E inside E's interval (joint with E).")


def results_markdown(result: dict) -> str:
    """A Markdown summary of `fit_runs`/`fit_sweep` output: runs, loss law, downstream fits."""
    loss_fit = result["loss_fit"]
    lines = [
        f"## Scaling: `{result['loss_column']}` vs compute C = 6·N·D",
        "",
        f"Method: {result['method']}. {loss_fit['n_points']} of {result['n_points_logged']} "
        f"logged points lie on the frontier and were fitted ({result['note']}).",
        "",
        "| run | depth | params | final compute (FLOPs) | final loss |",
        "|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        compute = run["final_compute"]
        loss = run["final_loss"]
        lines.append(
            f"| {run['name']} | {run['n_layers'] if run['n_layers'] is not None else '?'} "
            f"| {format_count(run['params'])} "
            f"| {format_number(compute) if compute is not None else '—'} "
            f"| {format_number(loss) if loss is not None else '—'} |")
    confidence = round(100 * loss_fit["confidence"])
    lines += ["", f"**Loss law:** {loss_fit['formula']}", "",
              f"| coefficient | estimate | {confidence}% CI |", "|---|---|---|"]
    for name in ("E", "A", "alpha"):
        lines.append(f"| {name} | {format_number(loss_fit[name])} | {_interval_text(loss_fit, name)} |")
    lines += ["", _loss_law_intervals_text(loss_fit)]
    if loss_fit.get("e_reason"):
        identified = loss_fit.get("e_identified", True)
        reason = loss_fit["e_reason"].removeprefix("E unidentified: ")
        lines += ["", f"**{'E identified' if identified else 'E unidentified'}:** {reason}."]
    if result.get("downstream"):
        lines += ["", "| metric | fit | formula | n points | intervals |", "|---|---|---|---|---|"]
        for metric, fits in result["downstream"].items():
            for kind, label in (("vs_compute", "vs compute"), ("vs_loss", "vs loss")):
                fit = fits[kind]
                if "skipped" in fit:
                    lines.append(f"| {metric} | {label} | skipped: {fit['skipped']} "
                                 f"| {fit['n_points']} | — |")
                    continue
                names = [k for k in fit.get("intervals", {})]
                ci = "; ".join(f"{k} {_interval_text(fit, k)}" for k in names) or "—"
                if not fit.get("identified", True):
                    ci = fit["reason"]
                elif names and fit.get("bootstrap"):
                    ci += f" ({_bootstrap_text(fit['bootstrap'])})"
                lines.append(f"| {metric} | {label} | {fit['formula']} | {fit['n_points']} | {ci} |")
    return "\n".join(lines) + "\n"
