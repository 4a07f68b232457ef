"""Utility versus compute: probing (and steering) at every checkpoint of a sweep.

The paper's Figures 2b/2c and 11 plot downstream utility against compute C = 6ND and
against the GLP's loss, over the intermediate checkpoints of its runs. Here every kept
checkpoint of every GLP run is evaluated and each result is appended to the run's
metrics.jsonl as {"step": s, "probe_auc_1d": ..., "steer_score": ...}; `glp fit` merges
these with the training rows of the same step and fits f(C) on the loss frontier and the
linear f(L), and `glp plot` draws them (glp_jax.scaling, glp_jax.plots).

The LLM's last-token activations of the probe tasks are computed once and reused for every
checkpoint (only the GLP changes), and the steering direction, prompts and activation
norm once per sweep, so the cost per checkpoint is the GLP's own.
"""

from __future__ import annotations

import math

from glp_jax.errors import GLPError
from glp_jax.progress import progress_bar
from glp_jax.rundir import RunDir

PROBE_COLUMN, STEER_COLUMN = "probe_auc_1d", "steer_score"
STEER_SCORE_RS = (1.2, 1.6, 2.0)  # points of the spec's grid inside steer_score's range


def checkpoint_steps(run_dir, which: str = "all") -> list[int]:
    """Steps with a complete checkpoint: all, or only the last."""
    from glp_jax.checkpoint import RunCheckpoints

    ckpt = RunCheckpoints(run_dir, async_save=False, keep_last_n=10**9)
    try:
        steps = sorted(ckpt.all_steps())
    finally:
        ckpt.close()
    if not steps:
        raise GLPError(f"{run_dir} has no complete checkpoint")
    return steps if which == "all" else steps[-1:]


def task_inputs_once(tasks, lm, layer: int, *, mlp: bool = True, max_length: int = 128,
                     batch_size: int = 32, progress: bool = True) -> dict:
    """{task name: last-token residual (and MLP) activations}: the LLM pass, done once and
    handed to every probe evaluation (evaluate_probes(inputs=...))."""
    from glp_jax.evals.features import task_inputs

    return {t.name: task_inputs(t, lm, layer, mlp=mlp, max_length=max_length,
                                batch_size=batch_size)
            for t in progress_bar(tasks, "probe inputs", "task", enabled=progress)}


def utility_over_checkpoints(paths, *, probe: bool = True, steer: bool = False,
                             which: str = "all", sigma: float = 0.5, seed: int = 0,
                             tasks=None, inputs: dict | None = None, lm=None,
                             max_tasks: int | None = 4, max_per_task: int | None = 300,
                             max_length: int = 128, steer_kwargs: dict | None = None,
                             progress: bool = True) -> dict:
    """Evaluate every checkpoint of every GLP run under `paths`; append the columns to each
    run's metrics.jsonl. `tasks`/`inputs`/`lm` reuse what a caller already has. Returns
    {run: [{step, probe_auc_1d, steer_score}, ...]}."""
    from glp_jax.api import load
    from glp_jax.evals.features import glp_method
    from glp_jax.evals.probe import evaluate_probes
    from glp_jax.evals.probe_data import fortune_tasks
    from glp_jax.evals.run_llm import run_llm_and_layer
    from glp_jax.evals.tables import find_targets

    glps, _ = find_targets(paths)
    if not glps:
        raise GLPError(f"no GLP runs under {paths}")
    name, layer = run_llm_and_layer(glps[0])
    if lm is None:
        from glp_jax.llm.loading import load_causal_lm

        lm = load_causal_lm(name, dtype="float32")
    if probe:
        tasks = tasks or fortune_tasks(max_tasks=max_tasks, max_per_task=max_per_task)
        inputs = inputs or task_inputs_once(tasks, lm, layer, mlp=False, max_length=max_length,
                                            progress=progress)
    scorer = steer_scorer(glps[0], lm, layer, seed=seed, **(steer_kwargs or {})) if steer else None
    if scorer is not None and progress:
        sc = scorer.scale
        print(f"[utility] steer_score scale: r x {sc['norm']} norm ({sc['unit']:.4g})"
              + (f", calibrated (r_sat {sc['r_saturation']:.3g}, {sc['calibration']})"
                 if sc["calibrated"] else "") + f", r in {sc['rs']}", flush=True)
    results: dict[str, list[dict]] = {}
    for run in glps:
        if run_llm_and_layer(run) != (name, layer):
            raise GLPError(f"{run} was trained on another LLM or layer than {glps[0]}; "
                           f"evaluate it separately")
        rows = []
        for step in checkpoint_steps(run, which):
            glp = load(run, step=step)
            row = {"step": int(step)}
            if probe:
                res = evaluate_probes(tasks, [glp_method(glp, sigma=sigma, seed=seed)],
                                      dense=False, progress=False, inputs=inputs)
                row[PROBE_COLUMN] = res["auc_1d"]["glp"]["mean"]
            if scorer is not None:
                row[STEER_COLUMN] = scorer(glp)
            rows.append(row)
            if progress:
                print(f"[utility] {run.name} step {step}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"),
                      flush=True)
        RunDir(run).add_metrics(rows)
        results[str(run)] = rows
    return results


def steer_scorer(run, lm, layer: int, *, seed: int = 0, n_prompts: int = 8,
                 rs=STEER_SCORE_RS, max_new_tokens: int = 20, n_direction: int = 64,
                 sigma0: float = 0.5, steps: int = 20, convention: str = "code",
                 batch_size: int = 32, norm: str = "diffmean", calibrate: bool = True,
                 calibration: dict | None = None):
    """glp -> steer_score (glp method, positive task) with texts, DiffMean direction, fluency
    judge and scale fixed once for the whole sweep.

    The scale is explicit, on the returned function's `.scale`: by default (norm="diffmean",
    calibrate=True) the CALIBRATED DiffMean-unit scale that finding 5's verdict uses
    (evals/steer.py): `rs`, points of the spec's grid inside steer_score's range [1.2, 2.0],
    map through calibrated_rs onto DiffMean's saturation coefficient. Pass the steering
    run's `calibration` so both use the same r_sat (glp reproduce does); without one it is
    measured here, on these prompts. calibrate=False: r x the `norm` unit (mean = the
    spec's scale)."""
    from glp_jax.evals.recon import GLPProjection
    from glp_jax.evals.steer import (
        SCORE_R_RANGE,
        calibrate_steering,
        calibrated_rs,
        diffmean_direction,
        evaluate_steering,
        fit_chunk,
        make_fluency_judge,
        steering_scale,
    )
    from glp_jax.evals.steer_data import steer_texts
    from glp_jax.llm.extract import tokenize_documents

    if calibration is not None and not (calibrate and norm == "diffmean"):
        raise GLPError(f"a calibration is used only on the calibrated DiffMean scale "
                       f"(norm='diffmean', calibrate=True), not norm={norm!r}, "
                       f"calibrate={calibrate}")
    texts = steer_texts(n_prompts=n_prompts, n_direction=n_direction, seed=seed)
    w, direction = diffmean_direction(lm, layer, texts.pos, texts.neg)
    act_norm, norm_info = steering_scale(run, layer, direction, norm)
    judge = make_fluency_judge(lm, tokenize_documents(lm.tokenizer, texts.prompts, 64),
                               texts.continuations, max_new_tokens=max_new_tokens, seed=seed,
                               batch_size=batch_size)
    rs, score_range = [float(r) for r in rs], SCORE_R_RANGE
    scale = {"norm": norm, "unit": act_norm, "source": norm_info.get("source"),
             "calibrated": False}
    if calibrate and norm == "diffmean":
        if calibration is None:
            calibration = calibrate_steering(lm, layer, w, act_norm, texts.prompts,
                                             max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, seed=seed,
                                             fluency_judge=judge)
            where = f"measured on the scorer's {len(texts.prompts)} prompts"
        elif not math.isclose(calibration["unit"], act_norm, rel_tol=1e-6):
            raise GLPError(f"the calibration was measured with a DiffMean norm of "
                           f"{calibration['unit']:.6g}, the scorer's direction has "
                           f"{act_norm:.6g}: other direction texts (n_direction) or layer")
        else:
            where = "given (the steering finding's)"
        rs, score_range = calibrated_rs(calibration, rs), calibrated_rs(calibration,
                                                                        SCORE_R_RANGE)
        scale.update(calibrated=True, r_saturation=calibration["r_saturation"],
                     calibration=where)
    scale.update(rs=rs, alphas=[r * act_norm for r in rs])

    def score(glp) -> float:
        rec = GLPProjection(glp, sigma0=sigma0, steps=steps, convention=convention, seed=seed)
        fit_chunk(rec, batch_size)
        res = evaluate_steering(lm, layer, w, act_norm, texts.prompts, {"glp": rec}, rs=rs,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                seed=seed, progress=False, fluency_judge=judge,
                                zero_arm=False, score_r_range=score_range)
        return float(res["steer_score"]["glp"])

    score.scale = scale
    return score
