"""`glp reproduce`: the paper's six findings on one plan, end to end, resumable.

    1. extraction sized for the sweep (train + held-out stores of one LLM layer)
    2. the depth sweep: one cosine run per depth, validation loss at log-spaced steps and
       log-spaced checkpoints (the data axis)
    3. baselines on the same store: a TopK SAE trained by the same loop, PCA
    4. utility vs compute: 1-D probe AUC (and steer_score) of every kept checkpoint; the
       steering calibration (DiffMean's concept saturation, evals/steer_calibration.json)
       first, so steer_score and finding 5 share one calibrated scale
    5. fits (loss law, downstream vs compute and vs loss) and their plots
    6. Table 1 (raw and bias-corrected FD, paired replicate intervals), Table 2 (delta LM
       loss), Table 4 (1-D and dense probing), steering (the calibrated DiffMean-unit scale,
       which decides finding 5, and the spec's mean-norm scale beside it)
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
# Steering twice: r x the mean activation norm (the spec's protocol, shown beside) and r x
# the DiffMean vector's norm on the calibrated grid (decides finding 5, plan.steer_calibrate;
# SmolLM2's mean norm is ~10x the DiffMean norm and degenerate: evals/steer.py docstring).
STEER_VARIANTS = (("mean", "steer"), ("diffmean", "steer_diffmean"))
CALIBRATION_NAME = "steer_calibration"
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
    evals = root / "evals"
    calibration = None
    if plan.steer_calibrate:
        with timings.part("steering calibration"):
            calibration = cached_json(evals / f"{CALIBRATION_NAME}.json",
                                      lambda: steer_calibration(plan, evals, ctx))
    with timings.part("utility"):
        utility_vs_compute(plan, sweep_dir, ctx, calibration)
    with timings.part("fits"):
        fit_and_plot(plan, sweep_dir, root / "plots")
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
        cal = calibration if norm == "diffmean" else None
        with timings.part(f"steering ({norm} norm)"):
            retire_old_steer(evals / f"{name}.json")
            cached_json(evals / f"{name}.json",
                        lambda n=norm, m=name, c=cal: steering(plan, best, baselines, evals,
                                                               ctx, n, m, c))
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


def utility_vs_compute(plan: ReproducePlan, sweep_dir: Path, ctx: EvalContext,
                       calibration: dict | None = None) -> None:
    """1-D probe AUC and steer_score at every kept checkpoint, one run at a time (a rerun
    redoes at most the run it was in). steer_score on plan.utility_steer_norm: "diffmean" =
    the calibrated scale of finding 5 (the same `calibration`) when plan.steer_calibrate."""
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
            lm=ctx.lm, max_length=plan.probe_max_length, steer_kwargs=utility_steer_kwargs(
                plan, calibration))


def utility_steer_kwargs(plan: ReproducePlan, calibration: dict | None) -> dict:
    """steer_scorer's arguments: the calibrated scale (finding 5's calibration) exactly when
    utility_steer_norm is diffmean and steer_calibrate is on; else r x that norm."""
    calibrated = plan.utility_steer_norm == "diffmean" and plan.steer_calibrate
    return {"n_prompts": plan.utility_steer_prompts, "n_direction": plan.steer_direction_texts,
            "norm": plan.utility_steer_norm, "calibrate": calibrated,
            "calibration": calibration if calibrated else None}


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


def steer_calibration(plan: ReproducePlan, evals: Path, ctx: EvalContext) -> dict:
    """DiffMean's concept saturation (evals/steer.py calibrate_steering) on
    steer_calibration_prompts fortune prompts, the steering prompts first, written once and
    shared by finding 5 and the utility steer_score."""
    from glp_jax.evals.steer import calibrate_steering, calibrated_rs, diffmean_direction
    from glp_jax.evals.steer_data import steer_texts
    from glp_jax.evals.utility import STEER_SCORE_RS
    from glp_jax.rundir import write_results

    n_prompts = plan.steer_calibration_prompts or 2 * plan.steer_prompts
    say(f"steering calibration: DiffMean alone at r x ||DiffMean|| for r in "
        f"{plan.steer_calibration_rs} on {n_prompts} prompts (saturation at "
        f"{plan.steer_saturation:g} of the best concept gain)")
    texts = steer_texts(n_prompts=n_prompts, n_direction=plan.steer_direction_texts,
                        seed=plan.seed)
    w, direction = diffmean_direction(ctx.lm, ctx.layer, texts.pos, texts.neg)
    cal = calibrate_steering(ctx.lm, ctx.layer, w, direction["raw_norm"], texts.prompts,
                             search_rs=plan.steer_calibration_rs,
                             saturation=plan.steer_saturation,
                             fluency_floor=plan.steer_fluency_floor, seed=plan.seed,
                             continuations=texts.continuations)
    cal["used_by"] = [f"steer_diffmean (finding 5's verdict): r in "
                      f"{calibrated_grid(plan, cal)} x ||DiffMean||"]
    kw = utility_steer_kwargs(plan, cal)
    if plan.utility_steer and kw["calibrate"]:
        cal["used_by"].append(f"the utility steer_score (finding 6): r in "
                              f"{calibrated_rs(cal, STEER_SCORE_RS)} x ||DiffMean||, on the "
                              f"first {plan.utility_steer_prompts} of these prompts")
    elif plan.utility_steer:
        cal["used_by"].append(f"NOT the utility steer_score (finding 6): it uses r x the "
                              f"{plan.utility_steer_norm} norm (plan utility_steer_norm)")
    say(f"steering calibration: r_sat = {cal['r_saturation']:g} x ||DiffMean|| "
        f"({cal['alpha_saturation']:.4g}); concept01 {cal['baseline_concept01']:.3f} unsteered "
        f"-> {cal['concept01_at_saturation']:.3f}"
        + ("" if cal["significant"] else " (no significant concept gain: r_sat = the largest "
           "r whose fluency stays above the floor)"))
    write_results(evals, CALIBRATION_NAME, cal)
    return cal


def calibrated_grid(plan: ReproducePlan, cal: dict) -> list[float]:
    from glp_jax.evals.steer import calibrated_rs

    return calibrated_rs(cal, plan.steer_rs)


def retire_old_steer(path: Path) -> None:
    """A steer*.json of an older schema (fluency relative to the greedy path, no r = 0
    arm) is renamed to *.schema1.json, so the step reruns and nothing is lost."""
    import json

    from glp_jax.evals.steer import SCHEMA

    if path.is_file() and json.loads(path.read_text()).get("schema", 1) < SCHEMA:
        say(f"{path.name} predates the text-based fluency judge: kept as "
            f"{path.stem}.schema1.json, rerunning")
        path.rename(path.with_name(f"{path.stem}.schema1.json"))


def steering(plan: ReproducePlan, best: Path, baselines, evals: Path, ctx: EvalContext,
             norm: str, name: str, calibration: dict | None = None) -> dict:
    """One steering variant; with a calibration its grid is plan.steer_rs rescaled onto
    DiffMean's saturation (evals/steer.py calibrated_rs)."""
    from glp_jax.evals.steer import steer_run

    grid = calibrated_grid(plan, calibration) if calibration else plan.steer_rs
    say(f"steering ({norm} norm{', calibrated' if calibration else ''}): {plan.steer_prompts} "
        f"prompts x r in {[0.0, *grid]}, diffmean / {best.name} / SAE")
    return steer_run(best, baselines=[baselines["sae"]], rs=plan.steer_rs,
                     n_prompts=plan.steer_prompts, n_direction=plan.steer_direction_texts,
                     seed=plan.seed, lm=ctx.lm, out_dir=evals, norm=norm, name=name,
                     calibrate=calibration is not None, calibration=calibration)
