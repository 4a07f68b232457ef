"""`glp reproduce`: the paper's six findings on one plan, end to end, resumable.

    1. extraction sized for the sweep (train + held-out stores of one LLM layer)
    2. the depth sweep: one cosine run per depth, validation loss at log-spaced steps and
       log-spaced checkpoints (the data axis)
    3. baselines on the same store: a TopK SAE trained by the same loop, PCA
    4. utility vs compute: 1-D probe AUC (and steer_score) of every kept checkpoint
    5. fits (loss law, downstream vs compute and vs loss) and their plots
    6. Table 1 (raw and bias-corrected FD, paired replicate intervals), Table 2 (delta LM
       loss), Table 4 (1-D and dense probing), steering (the spec's mean-norm scale and a DiffMean-relative one)
    7. the report: <report_dir>/REPORT.md, its PNGs and findings.json
Each part is skipped when its output exists, so a killed run resumes where it stopped;
<root>/timings.json adds up the seconds every part really took over all invocations.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from glp_jax.reproduce.plan import ReproducePlan
from glp_jax.reproduce.steps import Timings, cached_json, extract_stores, train_baselines

TAG = "reproduce"
# Steering twice: r x the mean activation norm (the spec's protocol, decides the verdict) and
# r x the DiffMean vector's norm (SmolLM2's mean norm is ~10x it; see evals/steer.py SCALES).
STEER_VARIANTS = (("mean", "steer"), ("diffmean", "steer_diffmean"))
ROBUST_TABLE1 = "table1_no_massive"


def say(msg: str) -> None:
    print(f"[{TAG} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_reproduce(plan: ReproducePlan, *, report: bool = True) -> Path:
    """Run (or resume) every part of `plan`; returns the report's path (or the root)."""
    from glp_jax.rundir import write_results

    root = Path(plan.root)
    root.mkdir(parents=True, exist_ok=True)
    write_results(root, "plan", plan.to_dict())
    timings = Timings(root / "timings.json")
    t0 = time.perf_counter()

    with timings.part("extract"):
        stores = extract_stores(root, {"train": plan.train_rows, "val": plan.val_rows},
                                model=plan.model, corpus=plan.corpus, layer=plan.layer,
                                max_length=plan.max_length, batch_tokens=plan.batch_tokens,
                                device=plan.device, tag=TAG)
    sweep_dir = root / "sweep"
    with timings.part("sweep"):
        run_sweep(plan, stores, sweep_dir)
    with timings.part("baselines"):
        baselines = train_baselines(stores, root, sae_config=plan.sae_config,
                                    sae_activations=plan.sae_activations, tag=TAG)
    ctx = EvalContext(plan, stores, timings)
    with timings.part("utility"):
        utility_vs_compute(plan, sweep_dir, ctx)
    with timings.part("fits"):
        fit_and_plot(plan, sweep_dir, root / "plots")
    evals = root / "evals"
    targets = [sweep_dir, baselines["sae"], baselines["pca"]]
    best = best_run(sweep_dir)
    with timings.part("table1 fd"):
        cached_json(evals / "table1.json", lambda: table1(plan, targets, evals))
    if plan.fd_drop_massive is not None:
        with timings.part("table1 fd (massive rows left out)"):
            cached_json(evals / f"{ROBUST_TABLE1}.json",
                        lambda: table1(plan, targets, evals, plan.fd_drop_massive))
    with timings.part("table2 delta-lm"):
        cached_json(evals / "table2.json", lambda: table2(plan, targets, evals, ctx))
    with timings.part("table4 probe"):
        cached_json(evals / "probe.json", lambda: table4(plan, best, baselines, evals, ctx))
    for norm, name in STEER_VARIANTS:
        with timings.part(f"steering ({norm} norm)"):
            cached_json(evals / f"{name}.json",
                        lambda n=norm, m=name: steering(plan, best, baselines, evals, ctx, n, m))
    say(f"all parts done in {time.perf_counter() - t0:.0f} s this invocation "
        f"({timings.total:.0f} s over all invocations)")
    if not report:
        return root
    from glp_jax.reproduce.report import write_report

    path = write_report(root, Path(plan.report_dir))
    say(f"report: {path}")
    return path


class EvalContext:
    """The LLM and the probe tasks' LLM activations, loaded once and only when needed."""

    def __init__(self, plan: ReproducePlan, stores, timings: Timings):
        self.plan, self.stores, self.timings = plan, stores, timings
        self._lm = self._tasks = self._inputs = None

    @property
    def layer(self) -> int:
        return self.stores["train"].layers[0]

    @property
    def lm(self):
        if self._lm is None:
            from glp_jax.llm.loading import load_causal_lm

            self._lm = load_causal_lm(self.plan.model, dtype="float32", device=self.plan.device)
        return self._lm

    @property
    def tasks(self):
        if self._tasks is None:
            from glp_jax.evals.probe_data import fortune_tasks, load_tasks

            self._tasks = (load_tasks(self.plan.probe_task_files) if self.plan.probe_task_files
                           else fortune_tasks(max_tasks=self.plan.probe_tasks,
                                              max_per_task=self.plan.probe_rows))
        return self._tasks

    @property
    def inputs(self) -> dict:
        if self._inputs is None:
            from glp_jax.evals.utility import task_inputs_once

            with self.timings.part("probe inputs"):
                self._inputs = task_inputs_once(self.tasks, self.lm, self.layer, mlp=True,
                                                max_length=self.plan.probe_max_length)
        return self._inputs


def run_sweep(plan: ReproducePlan, stores, sweep_dir: Path) -> None:
    from glp_jax.sweep import SweepPlan, run_local_sweep

    overrides = [f"config={plan.sweep_config}", f"train_dataset={stores['train'].url}",
                 f"val_dataset={stores['val'].url}"]
    widths = tuple(plan.widths) or None
    shapes = (", ".join(f"d{d} w{w}" for d, w in zip(plan.depths, widths, strict=True))
              if widths else f"depths {plan.depths}")
    say(f"sweep: {shapes} x {plan.activations:,} activations -> {sweep_dir}")
    run_local_sweep(overrides, SweepPlan(tuple(plan.depths), (plan.activations,),
                                         widths=widths, mlp_ratio=plan.mlp_ratio), sweep_dir)


def utility_vs_compute(plan: ReproducePlan, sweep_dir: Path, ctx: EvalContext) -> None:
    """1-D probe AUC and steer_score at every kept checkpoint, one run at a time (a rerun
    redoes at most the run it was in)."""
    from glp_jax.evals.utility import PROBE_COLUMN, STEER_COLUMN, utility_over_checkpoints
    from glp_jax.scaling import load_runs

    for run in load_runs(sweep_dir):
        probe = not run.has_column(PROBE_COLUMN)
        steer = plan.utility_steer and not run.has_column(STEER_COLUMN)
        if not (probe or steer):
            continue
        say(f"utility vs compute: {run.name}: " + " and ".join(
            x for x, on in (("1-D probe AUC", probe), ("steer_score", steer)) if on)
            + " of every kept checkpoint")
        utility_over_checkpoints(
            [run.path], probe=probe, steer=steer, sigma=plan.utility_sigma, seed=plan.seed,
            tasks=ctx.tasks if probe else None, inputs=ctx.inputs if probe else None,
            lm=ctx.lm, max_length=plan.probe_max_length, steer_kwargs={"n_prompts": plan.utility_steer_prompts,
                                     "n_direction": plan.steer_direction_texts,
                                     "norm": plan.utility_steer_norm})


def fit_and_plot(plan: ReproducePlan, sweep_dir: Path, plot_dir: Path) -> dict | None:
    """Fits and plots, unless scaling.json is newer than every run's metrics (a resume)."""
    from glp_jax.plots import plot_sweep
    from glp_jax.scaling import METRICS_FILE, RESULTS_JSON, fit_sweep, load_runs, write_results

    done = sweep_dir / RESULTS_JSON
    metrics = list(sweep_dir.rglob(METRICS_FILE))
    if done.is_file() and any(plot_dir.glob("*.png")) and metrics and \
            done.stat().st_mtime >= max(m.stat().st_mtime for m in metrics):
        return None
    say(f"fits ({plan.n_boot} bootstrap resamples) and plots -> {plot_dir}")
    result = fit_sweep(sweep_dir, n_boot=plan.n_boot)
    write_results(sweep_dir, result)
    plot_sweep(load_runs(sweep_dir), result, plot_dir)
    return result


def best_run(sweep_dir: Path) -> Path:
    """The run with the lowest held-out loss (used for Table 4 and steering)."""
    from glp_jax.scaling import load_runs

    runs = load_runs(sweep_dir)
    return min(runs, key=lambda r: float(np.nanmin(r.column("val_loss")))).path


def table1(plan: ReproducePlan, targets, evals: Path, drop_massive: float | None = None) -> dict:
    from glp_jax.evals.tables import fd_table

    left_out = ("" if drop_massive is None else
                f", reference rows > {drop_massive:g}x the median norm left out")
    say(f"Table 1: FD of {plan.fd_samples:,} samples x {plan.fd_steps_list} Euler steps vs "
        f"{plan.fd_samples:,} held-out rows ({plan.fd_reference}), bias-corrected with "
        f"{plan.fd_replicates} disjoint replicates{left_out}")
    return fd_table(targets, n=plan.fd_samples, steps=plan.fd_steps,
                    steps_list=plan.fd_steps_list, seed=plan.seed, pca_k=plan.pca_k,
                    out_dir=evals, reference=plan.fd_reference, replicates=plan.fd_replicates,
                    drop_massive=drop_massive,
                    name="table1" if drop_massive is None else ROBUST_TABLE1)


def table2(plan: ReproducePlan, targets, evals: Path, ctx: EvalContext) -> dict:
    from glp_jax.evals.tables import delta_lm_table

    say(f"Table 2: delta LM loss on {plan.dlm_seqs} held-out sequences of {plan.dlm_length} "
        f"tokens")
    return delta_lm_table(targets, n_seqs=plan.dlm_seqs, length=plan.dlm_length,
                          pca_k=plan.pca_k, seed=plan.seed, out_dir=evals, lm=ctx.lm)


def table4(plan: ReproducePlan, best: Path, baselines, evals: Path, ctx: EvalContext) -> dict:
    from glp_jax.evals.probe import probe_run

    say(f"Table 4: 1-D and dense probing on {len(ctx.tasks)} fortune tasks, {best.name} "
        f"meta-neurons (sigma {plan.probe_sigma}) vs raw, MLP neurons, SAE, PCA")
    return probe_run(best, baselines=[baselines["sae"], baselines["pca"]], tasks=ctx.tasks,
                     sigma=plan.probe_sigma, seed=plan.seed, pca_k=plan.pca_k, lm=ctx.lm,
                     layer=ctx.layer, inputs=ctx.inputs, max_length=plan.probe_max_length,
                     out_dir=evals)


def steering(plan: ReproducePlan, best: Path, baselines, evals: Path, ctx: EvalContext,
             norm: str, name: str) -> dict:
    from glp_jax.evals.steer import steer_run

    say(f"steering ({norm} activation norm): {plan.steer_prompts} prompts x r in "
        f"{plan.steer_rs}, diffmean / {best.name} / SAE")
    return steer_run(best, baselines=[baselines["sae"]], rs=plan.steer_rs,
                     n_prompts=plan.steer_prompts, n_direction=plan.steer_direction_texts,
                     seed=plan.seed, lm=ctx.lm, out_dir=evals, norm=norm, name=name)
