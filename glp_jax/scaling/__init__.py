"""Scaling-law fits for GLP sweeps: load runs, find the compute-efficient frontier, fit laws.

Compute is C = 6·N·D (N = all GLP parameters, D = activations seen), as in the paper.

- `runs`: a sweep's run folders read from disk (`Run`, `load_runs`).
- `frontier`: curves over compute and their lower envelope (`Curve`, `frontier`).
- `fits`: the loss law (profiled over its floor E) and the downstream laws, with intervals
  from a bootstrap over runs; fits the data cannot pin down are reported unidentified.
- `report`: all of it as one JSON-able result, and its files scaling.json / scaling.md.

Everything is numpy/scipy and pure, apart from reading runs and writing results.
"""

from glp_jax.scaling.fits import (
    Bootstrap,
    LinearFit,
    LossLawProfile,
    PowerLawFit,
    SaturatingFit,
    bootstrap_fit,
    fit_downstream_vs_compute,
    fit_linear_vs_loss,
    fit_loss_law_fixed_e,
    fit_power_law,
    group_resamples,
    loss_law_e_grid,
    profile_loss_law,
    resample_counts,
)
from glp_jax.scaling.formatting import format_count, format_number
from glp_jax.scaling.frontier import (
    Curve,
    Frontier,
    FrontierPoint,
    Switch,
    frontier,
    metric_curve,
    metric_vs_loss,
    run_curve,
)
from glp_jax.scaling.report import (
    RESULTS_JSON,
    RESULTS_MD,
    fit_runs,
    fit_sweep,
    read_results,
    results_markdown,
    write_results,
)
from glp_jax.scaling.runs import (
    COMPUTE_6ND,
    CONFIG_FILES,
    METRICS_FILE,
    Run,
    default_loss_column,
    load_run,
    load_runs,
    metric_columns,
)

__all__ = [
    "COMPUTE_6ND", "CONFIG_FILES", "METRICS_FILE", "RESULTS_JSON", "RESULTS_MD",
    "Bootstrap", "Curve", "Frontier", "FrontierPoint", "LinearFit", "LossLawProfile",
    "PowerLawFit", "Run", "SaturatingFit", "Switch", "bootstrap_fit", "default_loss_column",
    "fit_downstream_vs_compute", "fit_linear_vs_loss", "fit_loss_law_fixed_e",
    "fit_power_law", "fit_runs", "fit_sweep", "format_count", "format_number", "frontier",
    "group_resamples", "load_run", "load_runs", "loss_law_e_grid", "metric_columns",
    "metric_curve", "metric_vs_loss", "profile_loss_law", "read_results", "resample_counts",
    "results_markdown", "run_curve", "write_results",
]
