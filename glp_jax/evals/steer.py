"""On-manifold sentiment steering (GLP_SPEC.md section 6, EVAL_PROTOCOL.md "On-manifold
steering"), judged without a hosted model.

Protocol:
- Direction: DiffMean of last-token residuals at decoder layer k (`last_token_activations`,
  BOS/separator kept as in extraction): w = mean(pos) - mean(neg), w /= (||w|| + 1e-8).
  Texts: `glp_jax.evals.steer_data` (fortunes scored by VADER by default, or the user's).
- Strength: alpha = r * unit, the negative task uses -r. Units (SCALES):
  "mean" (the spec): the MEAN L2 norm of held-out activations of the layer, measured on rows
  of the run's val store (its train store when it has none; `act_norm.source` says which);
  the original used constants (5.2087 for Llama-3.2-1B layer 7). "centred": the same norm
  after removing the rows' mean. "diffmean": the norm of the raw DiffMean vector, so r = 1
  adds exactly mean(pos) - mean(neg).
  On SmolLM2 layer 14 the mean norm (~156) is dominated by two outlier (massive-activation)
  dimensions and is ~10x the DiffMean norm (~14.8): from r = 1.2 on the spec's grid every
  method's continuations are strings of commas and newlines, so that grid cannot separate
  the methods. Hence the CALIBRATED range (`calibrate_steering`, steer_run(calibrate=True)):
  in DiffMean units, DiffMean alone is run at a geometric search grid (CALIBRATION_RS,
  0.5..32) and the saturation coefficient r_sat is the smallest r whose concept01 reaches
  the unsteered baseline + 90% of DiffMean's best gain over the grid, counting only the r
  where DiffMean's fluency01 is still >= half the unsteered model's (VADER scores the
  "please, please, please" of a broken continuation as positive: that is no saturated
  concept). When the best gain is not significant (its paired bootstrap CI over prompts
  contains 0) there is no saturation to find: r_sat is then the largest r whose fluency is
  above that floor (the strongest push whose text is still text), flagged in the reports.
  The steering grid is
  then the spec's grid rescaled so that its top (2.0) is r_sat (r_k = r_sat * r_spec_k /
  2.0), and steer_score's range [1.2, 2.0] maps the same way. So the grid runs from ~no
  effect (r_sat / 10) to a saturated concept (or, without one, to the edge of fluent
  text). Every row also states alpha in the other
  units (`r_by_scale`), so the spec's mean-norm scale is shown beside the calibrated one.
- Edit: at decoder layer k, only the last position of every forward (the last prompt token
  at prefill, prompts left-padded; then each new token under the KV cache):
  diffmean: a' = a + alpha*w;  glp: a' = GLP on-manifold projection of a + alpha*w (sigma0
  0.5 in the code convention = 0.474 and 10 Euler steps of a 20-step grid; seeded, fresh
  noise each forward: call i uses seed + i);  sae (or any reconstructor given as a
  baseline): a' = its reconstruction of a + alpha*w.
  Every method also runs at r = 0 (`zero_arm`): for diffmean that is the unsteered model
  (its generations are reused), for glp/sae it is the projection/reconstruction ALONE, so
  the cost of the projection itself is visible beside the steered rows.
  Greedy decoding, 20 new tokens, several prompts per forward (`glp_jax.llm.generate`).
- Scores, on the continuation only (the prompt never counts):
  concept = VADER compound in [-1, 1] (sign-flipped for the negative task, so higher is
  better for both); optionally the positive-class probability of a Hugging Face
  text-classification model the user names (`classifier=`, local/offline; skipped when it
  cannot be loaded). fluency = `glp_jax.evals.fluency.FluencyJudge`: the per-token NLL of
  the continuation under the UNSTEERED model given the prompt (one forward over
  concatenated token ids, prompt tokens masked), mapped to [0, 1] against the NLL of REAL
  continuations of the same prompts (1) and of random tokens (0), times 1 - the repeated
  2-gram fraction. It scores the text, not its distance from the greedy path: a perfect
  projection costs nothing. The raw NLL is kept beside it (`fluency_nll`).
  Per method and r: means over prompts with 95% percentile-bootstrap CIs over prompts
  (scipy.stats.bootstrap, 9999 resamples, rng seeded).
- steer_score (the scaling summary; the original averaged the AxBench judge's 0-2 concept
  and fluency ratings): per r, (concept01 + fluency01) / 2, then the mean over r in
  `steer_score_r_range` ([1.2, 2.0] on the spec's grid, the original's |r| > 1; on the
  calibrated grid the same range rescaled). Mappings to [0, 1]:
  concept01 = mean over prompts of max(0, concept) (0 = absent or opposite sentiment, as a
  judge's 0; 1 = VADER's most positive); fluency01 = the mean of the judge's scores.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.evals import stats
from glp_jax.evals.fluency import FluencyJudge, continuation_ids
from glp_jax.evals.recon import describe_method
from glp_jax.llm.generate import LastPositionEdit, continuation_nll, greedy_generate
from glp_jax.progress import progress_bar

RESULT_NAME, PLOT_NAME = "steer", "steer_pareto.png"
SCHEMA = 2  # 2: text-based fluency judge, r = 0 arm, r_by_scale (1: exp(NLL0 - NLL))
DEFAULT_RS = tuple(round(0.2 * i, 1) for i in range(1, 11))
SCORE_R_RANGE = (1.2, 2.0)
# The calibration (calibrate_steering): DiffMean alone at these r x ||DiffMean||, and the
# saturation r_sat = the smallest r reaching baseline + SATURATION x the best concept gain;
# the calibrated grid maps the spec grid's top CALIBRATED_TOP onto r_sat.
CALIBRATION_RS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
SATURATION, CALIBRATED_TOP = 0.9, 2.0
FLUENCY_FLOOR = 0.5  # the search counts only r where DiffMean's fluency01 >= this x unsteered
DEFAULT_N_PROMPTS, DEFAULT_MAX_NEW_TOKENS, PROMPT_MAX_TOKENS = 32, 20, 64
N_RESAMPLES, NORM_ROWS = 9999, 8192
TASK_SIGN = {"positive": 1.0, "negative": -1.0}


# -- direction and strength -----------------------------------------------------------------

def diffmean_direction(lm, layer: int, pos: Sequence[str], neg: Sequence[str], *,
                       max_length: int = 2048, batch_size: int = 32,
                       progress: bool = False) -> tuple[np.ndarray, dict]:
    """(w [d] float32 unit norm, info): mean last-token residual of `pos` minus `neg`."""
    from glp_jax.llm.last_token import last_token_activations

    if not pos or not neg:
        raise GLPError("DiffMean needs at least one positive and one negative text")
    acts = last_token_activations(lm, layer, list(pos) + list(neg), max_length=max_length,
                                  batch_size=batch_size, progress=progress)["resid"]
    a = acts.astype(np.float64)
    w = a[: len(pos)].mean(0) - a[len(pos):].mean(0)
    raw = float(np.linalg.norm(w))
    w = w / (raw + 1e-8)
    return w.astype(np.float32), {"n_pos": len(pos), "n_neg": len(neg), "raw_norm": raw,
                                  "mean_last_token_norm": float(np.linalg.norm(a, axis=1).mean())}


NORMS = ("mean", "centred")
# How r is scaled: mean / centred activation norm (mean_activation_norm), or "diffmean": the
# norm of the raw DiffMean vector, so r = 1 adds exactly mean(pos) - mean(neg). On SmolLM2's
# layer 14 the mean norm (155) is ~10x the DiffMean norm (~15): r x mean norm breaks every
# continuation, while the DiffMean-relative scale spans weak to strong steering.
SCALES = (*NORMS, "diffmean")


def steering_scale(run_dir, layer: int, direction: dict, norm: str) -> tuple[float, dict]:
    """(the activation norm r multiplies, where it came from) for one of SCALES."""
    if norm == "diffmean":
        return direction["raw_norm"], {"source": "DiffMean vector norm", "norm": "diffmean"}
    if norm not in NORMS:
        raise GLPError(f"norm must be one of {SCALES}, got {norm!r}")
    return mean_activation_norm(run_dir, layer, norm=norm)


def mean_activation_norm(run_dir, layer: int | None = None, *, max_rows: int = NORM_ROWS,
                         norm: str = "mean") -> tuple[float, dict]:
    """Mean L2 norm of up to `max_rows` rows (evenly spaced) of the run's val store, or of
    its train store when run.json names no val store: (value, where it came from).

    norm="centred": the mean norm of the rows minus their mean, a scale that ignores the
    constant offset some LLMs carry in a few outlier dimensions (SmolLM2's layer 14: the
    mean norm is dominated by two of them), for comparison with the spec's "mean"."""
    if norm not in NORMS:
        raise GLPError(f"norm must be one of {NORMS}, got {norm!r}")
    from glp_jax.data.store import ActivationStore
    from glp_jax.rundir import RunDir

    run = RunDir(run_dir)
    for key in ("val_dataset", "train_dataset"):
        url = run.store_url(key)
        if not url:
            continue
        try:
            store = ActivationStore.open(str(url))
        except GLPError as e:
            warnings.warn(f"cannot open the run's {key} {url} ({e})", stacklevel=2)
            continue
        if len(store) == 0:
            continue
        n = min(max_rows, len(store))
        idx = np.unique(np.linspace(0, len(store) - 1, n).round().astype(np.int64))
        rows = store.read_rows(idx, layer=layer if len(store.layers) > 1 else None)
        rows = rows.astype(np.float64)
        if norm == "centred":
            rows = rows - rows.mean(0)
        value = float(np.linalg.norm(rows, axis=1).mean())
        return value, {"source": "val store" if key == "val_dataset" else "train store",
                       "store": str(url), "rows": int(len(idx)), "of_rows": len(store),
                       "norm": norm}
    raise GLPError(f"run {run_dir} names no readable val or train store to measure the mean "
                   f"activation norm on; pass act_norm= (e.g. 5.2087 for Llama-3.2-1B L7)")


# -- scores ---------------------------------------------------------------------------------

def concept_scores(texts: Sequence[str], task: str = "positive") -> np.ndarray:
    """VADER compound of each text, sign-flipped for the negative task (higher = better)."""
    from glp_jax.evals.steer_data import vader_compound

    return TASK_SIGN[task] * vader_compound(texts)


def bootstrap_ci(values, *, seed: int = 0, confidence: float = 0.95,
                 n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over prompts (evals.stats.bootstrap_ci)."""
    return stats.bootstrap_ci(values, seed=seed, confidence=confidence, n_resamples=n_resamples)


def _stat(values, seed: int) -> dict:
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(values)), "ci_low": lo, "ci_high": hi}


def distinct_ratio(tokens: Sequence[int]) -> float:
    """Unique tokens / tokens: a repetition check beside NLL (repetition can lower NLL)."""
    return len(set(tokens)) / max(len(tokens), 1)


def load_classifier(name: str) -> Callable[[list[str]], np.ndarray] | None:
    """A Hugging Face text-classification model (local or cached; offline) as texts ->
    P(positive) in [0, 1]: the probability of the label named like "pos...", else, for
    ordinal labels (LABEL_0..K or digits, e.g. SST-5), the expected class scaled to [0, 1].
    None (with a warning) when it cannot be loaded."""
    try:
        from transformers import pipeline

        clf = pipeline("text-classification", model=name, top_k=None, device="cpu")
    except Exception as e:  # noqa: BLE001 - any loading failure means: skip it
        warnings.warn(f"classifier {name!r} could not be loaded ({type(e).__name__}: {e}); "
                      f"skipping the classifier score", stacklevel=2)
        return None

    def score(texts: list[str]) -> np.ndarray:
        out = []
        for scores in clf([t if t.strip() else "." for t in texts], truncation=True):
            probs = {str(s["label"]).lower(): float(s["score"]) for s in scores}
            posl = [k for k in probs if "pos" in k]
            if posl:
                out.append(probs[posl[0]])
                continue
            try:
                idx = {k: int(k.rsplit("_", 1)[-1]) for k in probs}
            except ValueError as e:
                raise GLPError(f"classifier {name!r} labels {sorted(probs)} are neither "
                               f"positive/negative nor ordinal") from e
            k_max = max(max(idx.values()), 1)
            out.append(sum(p * idx[k] / k_max for k, p in probs.items()))
        return np.asarray(out, np.float64)

    return score


# -- the evaluation -------------------------------------------------------------------------

def _progress(enabled: bool, total: int):
    return progress_bar(total, "steer", "tok", enabled=enabled, unit_scale=True)


def _describe(rec) -> dict:
    return {"method": "diffmean", "post": None} if rec is None else describe_method(rec)


def make_fluency_judge(lm, prompt_ids: Sequence[Sequence[int]],
                       continuations: Sequence[str] | None, *, max_new_tokens: int,
                       seed: int = 0, batch_size: int = 32) -> FluencyJudge:
    """The judge calibrated on the real `continuations` of the prompts when given (one per
    prompt), else on held-out fortunes (FluencyJudge.fortune_reference)."""
    if continuations is None:
        return FluencyJudge.fortune_reference(lm, max_tokens=max_new_tokens, seed=seed,
                                              batch_size=batch_size)
    if len(continuations) != len(prompt_ids):
        raise GLPError(f"{len(continuations)} real continuations for {len(prompt_ids)} "
                       f"prompts: give one per prompt (or none for the fortune reference)")
    return FluencyJudge.calibrate(
        lm, prompt_ids, continuation_ids(lm.tokenizer, continuations, max_new_tokens),
        seed=seed, batch_size=batch_size,
        source=f"the real continuations of the {len(prompt_ids)} prompts")


def evaluate_steering(lm, layer: int, direction_D, act_norm: float, prompts: Sequence[str],
                      methods: Mapping[str, Callable | None], *, rs: Sequence[float] = DEFAULT_RS,
                      negative: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                      batch_size: int = 32, classifier=None, seed: int = 0,
                      progress: bool = True, continuations: Sequence[str] | None = None,
                      fluency_judge: FluencyJudge | None = None, zero_arm: bool = True,
                      score_r_range: Sequence[float] = SCORE_R_RANGE,
                      scales: Mapping[str, float] | None = None) -> dict:
    """Steer `lm` at decoder layer `layer` along `direction_D` (unit norm) with alpha =
    r * act_norm for every r, prompt and method, and score the continuations.

    `methods`: name -> None (plain addition, `diffmean`) or a reconstructor (raw [N, d] ->
    raw [N, d]) applied after the addition. `zero_arm`: add r = 0 to every method's rows
    (the unsteered model for diffmean, the reconstructor alone for the others).
    `fluency_judge`: a FluencyJudge, else one calibrated on `continuations` (the prompts'
    real continuations) or on held-out fortunes. `scales`: other units {name: value} to
    state each alpha in (`r_by_scale`). `classifier`: None, a HF model name (see
    load_classifier) or a callable texts -> P(positive). Returns a JSON-able dict."""
    if not prompts:
        raise GLPError("no prompts to steer")
    rs = [float(r) for r in rs]
    if not rs or min(rs) < 0:
        raise GLPError(f"rs must be non-negative strengths (the negative task flips the sign "
                       f"itself), got {rs}")
    if zero_arm and 0.0 not in rs:
        rs = [0.0, *rs]
    w = np.asarray(direction_D, np.float32)
    if not np.isfinite(act_norm) or act_norm <= 0:
        raise GLPError(f"act_norm must be a positive number, got {act_norm}")
    scales = {k: float(v) for k, v in (scales or {}).items()}
    tasks = ["positive", "negative"] if negative else ["positive"]
    from glp_jax.llm.extract import tokenize_documents

    tok = lm.tokenizer
    prompt_ids = tokenize_documents(tok, list(prompts), PROMPT_MAX_TOKENS)
    n_p = len(prompt_ids)
    clf_name = classifier if isinstance(classifier, str) else getattr(classifier, "__name__", None)
    if isinstance(classifier, str):
        classifier = load_classifier(classifier)
    t_judge = time.perf_counter()
    judge = fluency_judge or make_fluency_judge(lm, prompt_ids, continuations,
                                                max_new_tokens=max_new_tokens, seed=seed,
                                                batch_size=batch_size)
    t_judge = time.perf_counter() - t_judge
    # rows per method: task-major, then r, then prompt
    grid = [(t, r, p) for t in tasks for r in rs for p in range(n_p)]
    # diffmean at r = 0 is the unsteered model: reuse its generations
    todo = {m: [i for i, (_, r, _) in enumerate(grid) if post is not None or r != 0.0]
            for m, post in methods.items()}
    total = (n_p + sum(len(v) for v in todo.values())) * max_new_tokens
    bar = _progress(progress, total)
    t_start = time.perf_counter()
    timing: dict[str, dict] = {}
    gens: dict[str, list[list[int]]] = {}
    try:
        bar.set_postfix_str("unsteered", refresh=False)
        g0 = greedy_generate(lm, prompt_ids, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, bar=bar)
        gens["none"] = g0.tokens
        timing["none"] = _timing(g0)
        for name, post in methods.items():
            bar.set_postfix_str(name, refresh=False)
            rows = [grid[i] for i in todo[name]]
            tokens = [list(g0.tokens[p]) for _, _, p in grid]
            if rows:
                edit = LastPositionEdit(w, post=post)
                g = greedy_generate(lm, [prompt_ids[p] for _, _, p in rows],
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    layer=layer, edit=edit,
                                    alphas=[TASK_SIGN[t] * r * act_norm for t, r, _ in rows],
                                    bar=bar)
                for i, toks in zip(todo[name], g.tokens, strict=True):
                    tokens[i] = toks
                timing[name] = _timing(g)
            gens[name] = tokens
    finally:
        bar.close()
    t_gen = time.perf_counter() - t_start
    # fluency under the unsteered model: every continuation in one pass
    all_prompts = list(prompt_ids) + [prompt_ids[p] for _ in methods for _, _, p in grid]
    all_conts = gens["none"] + [c for m in methods for c in gens[m]]
    t0 = time.perf_counter()
    nll_all = continuation_nll(lm, all_prompts, all_conts, batch_size=batch_size)
    fluency_all = judge.score(nll_all, all_conts)
    rep_all = judge.repetition(all_conts)
    t_nll = time.perf_counter() - t0
    texts_all = [tok.decode(c, skip_special_tokens=True) for c in all_conts]
    from glp_jax.evals.steer_data import vader_compound

    compound_all = vader_compound(texts_all)
    clf_all = None
    if classifier is not None:
        clf_all = np.asarray(classifier(texts_all), np.float64)

    def sl(block: int):  # rows of block 0 (unsteered) or method block i >= 1
        start = 0 if block == 0 else n_p + (block - 1) * len(grid)
        return slice(start, start + (n_p if block == 0 else len(grid)))

    def scored(cs: slice, sign: float) -> dict:
        concept = sign * compound_all[cs]
        return {"concept": _stat(concept, seed), "fluency": _stat(fluency_all[cs], seed),
                "fluency_nll": _stat(nll_all[cs], seed),
                "concept01": float(np.maximum(concept, 0).mean()),
                "fluency01": float(fluency_all[cs].mean()),
                "repetition": float(rep_all[cs].mean()),
                "distinct": float(np.mean([distinct_ratio(all_conts[i])
                                           for i in range(cs.start, cs.stop)]))}

    lo_r, hi_r = (float(x) for x in score_r_range)
    result_tasks: dict[str, dict] = {}
    unsteered: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    generations = []
    s0 = sl(0)
    for ti, task in enumerate(tasks):
        sign = TASK_SIGN[task]
        unsteered[task] = scored(s0, sign)
        if clf_all is not None:
            unsteered[task]["classifier"] = _stat(_clf_task(clf_all[s0], task), seed)
        result_tasks[task] = {}
        scores[task] = {}
        for mi, name in enumerate(methods, start=1):
            rows = []
            block = sl(mi)
            for ri, r in enumerate(rs):
                off = block.start + (ti * len(rs) + ri) * n_p
                cs = slice(off, off + n_p)
                alpha = sign * r * act_norm
                row = {"r": r, "alpha": alpha, **scored(cs, sign),
                       "r_by_scale": {k: abs(alpha) / v for k, v in scales.items()}}
                row["combined01"] = (row["concept01"] + row["fluency01"]) / 2
                if clf_all is not None:
                    row["classifier"] = _stat(_clf_task(clf_all[cs], task), seed)
                rows.append(row)
                for p in range(n_p):
                    i = off + p
                    generations.append({"task": task, "method": name, "r": r, "prompt": p,
                                        "text": texts_all[i], "compound": float(compound_all[i]),
                                        "nll": float(nll_all[i]),
                                        "fluency": float(fluency_all[i]),
                                        "repetition": float(rep_all[i])})
            result_tasks[task][name] = rows
            in_range = [x["combined01"] for x in rows
                        if x["r"] > 0 and lo_r - 1e-9 <= x["r"] <= hi_r + 1e-9]
            scores[task][name] = float(np.mean(in_range)) if in_range else None
    for p in range(n_p):
        generations.append({"task": "none", "method": "none", "r": 0.0, "prompt": p,
                            "text": texts_all[p], "compound": float(compound_all[p]),
                            "nll": float(nll_all[p]), "fluency": float(fluency_all[p]),
                            "repetition": float(rep_all[p])})
    n_tokens = sum(t["forward_tokens"] for t in timing.values())
    return {
        "schema": SCHEMA,
        "model": getattr(lm, "model_id", type(lm.model).__name__),
        "layer": int(layer),
        "rs": rs,
        "zero_arm": bool(zero_arm),
        "tasks": tasks,
        "act_norm": {"value": float(act_norm)},
        "scales": scales,
        "n_prompts": n_p,
        "prompts": list(prompts),
        "max_new_tokens": max_new_tokens,
        "methods": {m: _describe(p) for m, p in methods.items()},
        "fluency_judge": judge.to_dict(),
        "unsteered": unsteered,
        "results": result_tasks,
        "steer_score": scores["positive"],
        "steer_score_by_task": scores,
        "steer_score_r_range": [lo_r, hi_r],
        "classifier": clf_name if classifier is not None else None,
        "generations": generations,
        "batch_size": batch_size,
        "seed": seed,
        "llm_dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "timing": {"generation_seconds": t_gen, "nll_seconds": t_nll,
                   "judge_calibration_seconds": t_judge,
                   "forward_tokens": n_tokens, "tokens_per_s": n_tokens / max(t_gen, 1e-12),
                   "by_method": timing},
    }


# -- the calibrated coefficient range -------------------------------------------------------

def saturation_coefficient(rs: Sequence[float], concept01: Sequence[float], baseline: float,
                           saturation: float = SATURATION, *,
                           fluency01: Sequence[float] | None = None,
                           min_fluency01: float | None = None,
                           concept_by_prompt=None, baseline_by_prompt=None,
                           seed: int = 0) -> dict:
    """The smallest r whose concept01 reaches baseline + saturation x (the best concept01 -
    baseline), over a search grid `rs` (sorted here).

    - With `fluency01` and `min_fluency01` only the r whose fluency01 is at least that count
      (the "eligible" ones): a concept score read off text that is no longer text (VADER
      rates "please, please, please" positive) is not a saturated concept; if none is
      eligible, all are (`fluent_search` False).
    - With the per-prompt concepts (`concept_by_prompt` [R, P] in the order of `rs`,
      `baseline_by_prompt` [P]) the best gain must be significant: its 95% paired bootstrap
      CI over prompts (`gain_ci`) must exclude 0.
    Without a (significant) gain nothing saturates inside the grid: the largest eligible r
    is returned, i.e. the strongest push under which DiffMean's text is still text
    (`significant` False; reports say so)."""
    if not 0 < saturation <= 1:
        raise GLPError(f"saturation must be in (0, 1], got {saturation}")
    if len(rs) != len(concept01) or len(rs) < 2:
        raise GLPError(f"need >= 2 search coefficients with one concept01 each, got "
                       f"{len(rs)} and {len(concept01)}")
    order = np.argsort(np.asarray(rs, np.float64), kind="stable")
    r = np.asarray(rs, np.float64)[order]
    c = np.asarray(concept01, np.float64)[order]
    ok = np.ones(len(r), bool)
    if fluency01 is not None and min_fluency01 is not None:
        ok = np.asarray(fluency01, np.float64)[order] >= min_fluency01
    fluent = bool(ok.any())
    cand = np.flatnonzero(ok) if fluent else np.arange(len(r))
    best = int(cand[np.argmax(c[cand])])
    gain = float(c[best] - baseline)
    gain_ci = None
    significant = gain > 0
    if concept_by_prompt is not None and baseline_by_prompt is not None:
        diff = (np.asarray(concept_by_prompt, np.float64)[order][best]
                - np.asarray(baseline_by_prompt, np.float64))
        gain_ci = stats.bootstrap_ci(diff, seed=seed)
        significant = bool(gain_ci[0] > 0)
    if significant:
        i = int(cand[np.argmax(c[cand] >= baseline + saturation * gain)])
    else:
        i = int(cand[-1])
    return {"r_saturation": float(r[i]), "concept01_at_saturation": float(c[i]),
            "r_best": float(r[best]), "concept01_best": float(c[best]),
            "baseline_concept01": float(baseline), "gain": gain,
            "gain_ci": None if gain_ci is None else list(gain_ci), "significant": significant,
            "saturation": saturation, "min_fluency01": min_fluency01,
            "eligible": [float(x) for x in r[cand]], "fluent_search": fluent}


def calibrate_steering(lm, layer: int, direction_D, unit: float, prompts: Sequence[str], *,
                       search_rs: Sequence[float] = CALIBRATION_RS,
                       saturation: float = SATURATION, fluency_floor: float = FLUENCY_FLOOR,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 32,
                       seed: int = 0, continuations: Sequence[str] | None = None,
                       fluency_judge: FluencyJudge | None = None,
                       progress: bool = False) -> dict:
    """DiffMean alone at alpha = r x `unit` (the raw DiffMean norm) for r in `search_rs`, on
    the positive task: its concept01 (and the judge's fluency01) per r and the saturation
    coefficient (saturation_coefficient), counting only the r whose fluency01 is at least
    `fluency_floor` x the unsteered model's. `calibrated_rs` turns it into a grid."""
    res = evaluate_steering(lm, layer, direction_D, unit, prompts, {"diffmean": None},
                            rs=search_rs, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, seed=seed, progress=progress,
                            continuations=continuations, fluency_judge=fluency_judge,
                            zero_arm=False)
    rows = res["results"]["positive"]["diffmean"]
    base = res["unsteered"]["positive"]
    per = np.zeros((len(rows) + 1, res["n_prompts"]))  # row 0: unsteered, then the search
    index = {x["r"]: i for i, x in enumerate(rows, start=1)}
    for g in res["generations"]:
        i = 0 if g["method"] == "none" else index[g["r"]]
        per[i, g["prompt"]] = max(0.0, g["compound"])
    sat = saturation_coefficient([x["r"] for x in rows], [x["concept01"] for x in rows],
                                 base["concept01"], saturation,
                                 fluency01=[x["fluency01"] for x in rows],
                                 min_fluency01=fluency_floor * base["fluency01"],
                                 concept_by_prompt=per[1:], baseline_by_prompt=per[0],
                                 seed=seed)
    return {"unit": float(unit), "unit_name": "diffmean", "n_prompts": res["n_prompts"],
            "max_new_tokens": max_new_tokens, **sat, "fluency_floor": fluency_floor,
            "alpha_saturation": sat["r_saturation"] * float(unit),
            "calibrated_top": CALIBRATED_TOP,
            "baseline_fluency01": base["fluency01"],
            "search": [{"r": x["r"], "alpha": x["alpha"], "concept01": x["concept01"],
                        "fluency01": x["fluency01"], "repetition": x["repetition"]}
                       for x in rows],
            "fluency_judge": res["fluency_judge"],
            "seconds": res["timing"]["generation_seconds"] + res["timing"]["nll_seconds"]}


def calibrated_rs(calibration: Mapping, rs: Sequence[float] = DEFAULT_RS) -> list[float]:
    """The spec-shaped grid `rs` rescaled so that CALIBRATED_TOP (2.0) lands on the
    calibration's saturation coefficient, in its unit (DiffMean norms)."""
    k = float(calibration["r_saturation"]) / CALIBRATED_TOP
    return [round(k * float(r), 6) for r in rs]


def _clf_task(p_pos: np.ndarray, task: str) -> np.ndarray:
    return p_pos if task == "positive" else 1.0 - p_pos


def _timing(g) -> dict:
    return {"seconds": g.seconds, "forward_tokens": g.forward_tokens,
            "tokens_per_s": g.forward_tokens / max(g.seconds, 1e-12),
            "post_seconds": g.post_seconds, "edit_seconds": g.edit_seconds,
            "llm_seconds": g.llm_seconds}


# -- reports --------------------------------------------------------------------------------

SCALE_LABELS = {"mean": "mean activation norm", "centred": "centred activation norm",
                "diffmean": "DiffMean vector norm"}


def _ci(s: dict, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(s['mean'])} [{fmt.format(s['ci_low'])}, {fmt.format(s['ci_high'])}]"


def _r(x: float) -> str:
    return f"{x:.3g}"


def calibration_markdown(cal: Mapping, scales: Mapping[str, float] | None = None) -> list[str]:
    """The search table and the saturation coefficient it gave (lines)."""
    scales = dict(scales or {})
    scales.pop("diffmean", None)
    extra = "".join(f" r ({k} norm) |" for k in scales)
    how = (f"the smallest r whose concept01 reaches the unsteered "
           f"{cal['baseline_concept01']:.3f} + {100 * cal['saturation']:.0f}% of the best gain"
           if cal.get("significant", cal["gain"] > 0) else
           f"no significant concept gain over the unsteered {cal['baseline_concept01']:.3f}, "
           f"so the largest r whose fluency01 stays above the floor")
    lines = [f"Calibrated range: DiffMean alone at alpha = r x ||DiffMean|| ({cal['unit']:.4g}) "
             f"on {cal['n_prompts']} prompts; r_sat = {_r(cal['r_saturation'])} (alpha "
             f"{cal['alpha_saturation']:.4g}): {how} (best gain {cal['gain']:+.3f}, concept01 "
             f"{cal['concept01_best']:.3f} at r = {_r(cal['r_best'])}; only r where DiffMean's "
             f"fluency01 >= {cal.get('fluency_floor', 0):g} x the unsteered "
             f"{cal['baseline_fluency01']:.3f} count). The steering grid is the spec's grid x "
             f"r_sat / {cal['calibrated_top']:g}."]
    if not cal.get("significant", cal["gain"] > 0):
        ci = cal.get("gain_ci")
        lines.append("WARNING: DiffMean's best concept gain is not significant"
                     + (f" (95% CI {ci[0]:+.3f}..{ci[1]:+.3f} over prompts)" if ci else "")
                     + ": no saturation to calibrate on, so r_sat is the largest r at which "
                     "its fluency stays above the floor (the strongest push whose text is "
                     "still text).")
    if not cal.get("fluent_search", True):
        lines.append("WARNING: at every searched r DiffMean's fluency was below the floor; "
                     "all were counted.")
    lines += ["", "| r (DiffMean norm) | alpha |" + extra + " concept01 | fluency01 | "
              "repetition |", "|---|---|" + "---|" * len(scales) + "---|---|---|"]
    for x in cal["search"]:
        cells = "".join(f" {_r(x['alpha'] / v)} |" for v in scales.values())
        mark = " (r_sat)" if x["r"] == cal["r_saturation"] else ""
        if x["r"] not in cal.get("eligible", [x["r"]]):
            mark += " (fluency below the floor: not counted)"
        lines.append(f"| {_r(x['r'])}{mark} | {x['alpha']:.4g} |{cells} {x['concept01']:.3f} | "
                     f"{x['fluency01']:.3f} | {x['repetition']:.3f} |")
    return lines


def steer_markdown(result: dict) -> str:
    """Per task: one row per method and r (r in every scale, concept, fluency with CIs, the
    [0,1] maps), the unsteered row, steer_score, and a few continuations at the largest r;
    the calibration search and the fluency judge's anchors."""
    an = result["act_norm"]
    scales = result.get("scales", {})
    label = SCALE_LABELS.get(an.get("norm", "mean"), an.get("norm", "given"))
    source = an.get("source", "given")
    where = "" if source == label else f", {source}"
    where += f", {an['rows']} rows" if "rows" in an else ""
    lines = [f"# On-manifold steering: {result['model']} layer {result['layer']}", "",
             f"{result['n_prompts']} prompts, {result['max_new_tokens']} new tokens (greedy), "
             f"alpha = r x {an['value']:.4f} ({label}{where}), LLM {result['llm_dtype']}."]
    if scales:
        lines.append("Scales (every row states alpha in each): " + "; ".join(
            f"{SCALE_LABELS.get(k, k)} {v:.4g}" for k, v in scales.items()) + ".")
    if result.get("direction"):
        d = result["direction"]
        lines.append(f"DiffMean direction from {d['n_pos']} positive / {d['n_neg']} negative "
                     f"texts (||mean diff|| = {d['raw_norm']:.3f}).")
    if result.get("texts"):
        lines.append("Texts: " + "; ".join(f"{k}: {v}" for k, v in result["texts"].items()
                                          if isinstance(v, str)) + ".")
    fj = result["fluency_judge"]
    lines.append("Concept: VADER compound of the continuation (sign-flipped for the negative "
                 "task; higher is better). Fluency (0-1, higher is better): "
                 f"{fj['formula']}, NLL per token under the unsteered model; anchors NLL_real "
                 f"= {fj['real_nll']:.3f} ({fj['source']}), NLL_random = "
                 f"{fj['random_nll']:.3f} (random tokens after the same prompts). 95% "
                 f"bootstrap CIs over prompts.")
    if result.get("calibration"):
        lines += [""] + calibration_markdown(result["calibration"], scales)
    others = [k for k in scales if k != an.get("norm")]  # the run's own unit is r itself
    for task in result["tasks"]:
        clf = result.get("classifier") is not None
        lines += ["", f"## {task} sentiment", "",
                  "| method | r | alpha |" + "".join(f" r ({k}) |" for k in others)
                  + " concept | fluency | fluency NLL | concept01 | fluency01 | repetition |"
                  + (" classifier |" if clf else ""),
                  "|---|---|---|" + "---|" * len(others) + "---|---|---|---|---|---|"
                  + ("---|" if clf else "")]
        u = result["unsteered"][task]
        lines.append("| unsteered | 0 | 0 |" + " 0 |" * len(others)
                     + f" {_ci(u['concept'])} | {_ci(u['fluency'])} | {_ci(u['fluency_nll'])} | "
                     f"{u['concept01']:.3f} | {u['fluency01']:.3f} | {u['repetition']:.3f} |"
                     + (f" {_ci(u['classifier'])} |" if clf else ""))
        for m, rows in result["results"][task].items():
            for x in rows:
                by = x.get("r_by_scale", {})
                lines.append(f"| {m} | {_r(x['r'])} | {x['alpha']:.2f} |"
                             + "".join(f" {_r(by[k])} |" for k in others)
                             + f" {_ci(x['concept'])} | {_ci(x['fluency'])} | "
                             f"{_ci(x['fluency_nll'])} | {x['concept01']:.3f} | "
                             f"{x['fluency01']:.3f} | {x['repetition']:.3f} |"
                             + (f" {_ci(x['classifier'])} |" if clf else ""))
        if result.get("zero_arm"):
            lines += ["", "r = 0 rows: diffmean = the unsteered model; every other method = its "
                      "projection/reconstruction ALONE (no steering), so its fluency01 next to "
                      "the unsteered row is the cost of the projection itself."]
        lo, hi = result["steer_score_r_range"]
        lines += ["", f"steer_score (mean over r in [{_r(lo)}, {_r(hi)}] of (concept01 + "
                  f"fluency01)/2; concept01 = mean max(0, concept), fluency01 = mean fluency): "
                  + ", ".join(f"{m} {'n/a' if s is None else f'{s:.3f}'}"
                              for m, s in result["steer_score_by_task"][task].items())]
        r_max = max(result["rs"])
        lines += ["", f"Continuations at r = {_r(r_max)} (first 3 prompts):", ""]
        for p in range(min(3, result["n_prompts"])):
            lines.append(f"- prompt: {result['prompts'][p]!r}")
            for g in result["generations"]:
                if g["prompt"] == p and ((g["method"] == "none" and task == result["tasks"][0])
                                         or (g["task"] == task and g["r"] == r_max)):
                    lines.append(f"  - {g['method']} (fluency {g['fluency']:.2f}): "
                                 f"{g['text']!r}")
    t = result["timing"]
    lines += ["", f"Generation {t['generation_seconds']:.1f} s ({t['tokens_per_s']:.0f} "
              f"tokens/s over {t['forward_tokens']:,} generated tokens), NLL scoring "
              f"{t['nll_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def summarize_steer(result: dict) -> str:
    """One line: steer_score per method, the scale, throughput."""
    s = ", ".join(f"{m} {'n/a' if v is None else f'{v:.3f}'}"
                  for m, v in result["steer_score"].items())
    t = result["timing"]
    cal = result.get("calibration")
    scale = result["act_norm"].get("norm", "given") + " norm"
    if cal:
        scale += f" (calibrated, r_sat {_r(cal['r_saturation'])})"
    rs = [r for r in result["rs"] if r > 0] or result["rs"]
    return (f"steering ({result['model']} L{result['layer']}, {result['n_prompts']} prompts, "
            f"r = 0 and {_r(min(rs))}..{_r(max(rs))} x {scale}): steer_score {s} | "
            f"{t['generation_seconds']:.0f} s, {t['tokens_per_s']:.0f} tok/s")


def plot_steer_pareto(result: dict, path, task: str = "positive") -> Path:
    """The paper's Figure 5: concept (x) vs the judge's fluency (y, higher is better), one
    line per method through its r values (r = 0 included, labelled), CIs as error bars, the
    unsteered point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    u = result["unsteered"][task]
    ax.plot([u["concept"]["mean"]], [u["fluency"]["mean"]], marker="*", ms=14,
            color="black", ls="none", label="unsteered", zorder=5)
    for i, (m, rows) in enumerate(result["results"][task].items()):
        x = np.array([r["concept"]["mean"] for r in rows])
        y = np.array([r["fluency"]["mean"] for r in rows])
        xerr = np.array([[r["concept"]["mean"] - r["concept"]["ci_low"],
                          r["concept"]["ci_high"] - r["concept"]["mean"]] for r in rows]).T
        yerr = np.array([[r["fluency"]["mean"] - r["fluency"]["ci_low"],
                          r["fluency"]["ci_high"] - r["fluency"]["mean"]] for r in rows]).T
        color = f"C{i}"
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=color, alpha=0.25, ls="none", lw=1)
        ax.plot(x, y, marker="o", color=color, label=m, zorder=4)
        for j in sorted({0, len(rows) - 1}):
            ax.annotate(f"r={rows[j]['r']:.3g}", (x[j], y[j]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8, color=color)
    ax.set_xlabel(f"Concept: VADER compound of the continuation ({task}; higher is better)")
    ax.set_ylabel("Fluency: 1 = real text, 0 = random tokens (higher is better)")
    ax.set_ylim(-0.05, 1.05)
    scale = SCALE_LABELS.get(result["act_norm"].get("norm", ""), "given norm")
    ax.set_title(f"Steering {result['model']} layer {result['layer']}, "
                 f"{result['n_prompts']} prompts, r x {scale}"
                 + (" (calibrated)" if result.get("calibration") else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return path


# -- a trained run, end to end (what `glp eval steer RUN [BASELINES...]` calls) -----------

def fit_chunk(rec, rows: int) -> None:
    """Steering calls a reconstructor with <= `rows` rows per forward (the generation batch):
    make that its chunk, so a full batch is one unpadded compiled shape (the default chunking
    pads small calls to >= 64 rows, doubling the GLP's cost at batch 32)."""
    for attr in ("batch_size", "chunk"):  # GLPProjection, LoadedSAE
        if isinstance(getattr(rec, attr, None), int):
            setattr(rec, attr, int(rows))


def _method_name(rec, taken: set[str]) -> str:
    base = _describe(rec).get("method", "baseline")
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def _scales(run_dir, layer: int, direction: dict, norm: str, act_norm: float) -> dict:
    """{scale: unit} for r_by_scale: the run's own, the DiffMean norm, and the spec's mean
    norm where the run's stores can be read."""
    scales = {norm: float(act_norm), "diffmean": float(direction["raw_norm"])}
    if "mean" not in scales:
        try:
            scales["mean"] = mean_activation_norm(run_dir, layer)[0]
        except GLPError:
            pass  # no readable store: the mean-norm column is left out
    return scales


def steer_run(run_dir, baselines: Sequence = (), *, rs: Sequence[float] = DEFAULT_RS,
              n_prompts: int = DEFAULT_N_PROMPTS,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sigma0: float = 0.5,
              steps: int = 20, convention: str = "code", seed: int = 0, pos=None, neg=None,
              prompts=None, out_dir=None, progress: bool = True, negative: bool = False,
              methods: Sequence[str] = ("diffmean", "glp"), n_direction: int | None = None,
              batch_size: int = 32, act_norm: float | None = None, layer: int | None = None,
              step: int | str = "latest", lm=None, device: str = "cpu", classifier=None,
              write: bool = True, norm: str = "mean", name: str = RESULT_NAME,
              calibrate: bool = False, calibration: Mapping | None = None,
              calibration_rs: Sequence[float] = CALIBRATION_RS,
              saturation: float = SATURATION, fluency_floor: float = FLUENCY_FLOOR,
              continuations=None, zero_arm: bool = True) -> dict:
    """Sentiment steering with a trained GLP run (methods `diffmean`, `glp`) and baselines
    (SAE runs / PCA folders: a reconstruction after the addition, named by their kind).

    The run's training store names the LLM, the layer and (val store, else train store) the
    activations whose mean norm scales r; `act_norm=` overrides it. Texts: `pos`/`neg`/
    `prompts` (lists or files, see steer_data; `continuations` = the prompts' real ones for
    the fluency judge), else the fortune default. Writes steer.json, steer.md and
    steer_pareto.png (+ steer_pareto_negative.png with negative=True) to `out_dir` (default
    <run>/evals) unless write=False; `name` replaces "steer" in those file names.
    norm: how r is scaled (SCALES). calibrate=True: the calibrated range (module docstring):
    `calibration` (calibrate_steering's dict for the same direction, e.g. one computed once
    for a sweep) or a fresh search over `calibration_rs`; `rs` is then the grid's shape
    (calibrated_rs) and steer_score's range is rescaled with it."""
    from glp_jax.evals.delta_lm import build_methods
    from glp_jax.evals.recon import load_reconstructor
    from glp_jax.evals.run_llm import run_lm
    from glp_jax.evals.steer_data import DEFAULT_N_DIRECTION, steer_texts
    from glp_jax.llm.extract import tokenize_documents
    from glp_jax.rundir import EVALS_DIR, RunDir, write_results

    unknown = sorted(set(methods) - {"diffmean", "glp"})
    if unknown:
        raise GLPError(f"unknown steering method(s) {unknown}; choose from diffmean, glp "
                       f"(SAE/PCA: pass their folders as baselines)")
    if n_prompts < 1:
        raise GLPError(f"n_prompts must be >= 1, got {n_prompts}")
    if calibration is not None and not calibrate:
        raise GLPError("calibration= is used only with calibrate=True")
    lm, layer, _ = run_lm(run_dir, layer, lm, device)
    texts = steer_texts(pos, neg, prompts, n_prompts=n_prompts,
                        n_direction=n_direction or DEFAULT_N_DIRECTION, seed=seed,
                        continuations=continuations)
    w, direction = diffmean_direction(lm, layer, texts.pos, texts.neg, progress=progress)
    if calibration is not None and not math.isclose(calibration["unit"], direction["raw_norm"],
                                                    rel_tol=1e-6):
        raise GLPError(f"the calibration was measured with a DiffMean norm of "
                       f"{calibration['unit']:.6g}, this direction's is "
                       f"{direction['raw_norm']:.6g}: it belongs to other texts or another "
                       f"layer; calibrate again")
    if act_norm is None:
        act_norm, norm_info = steering_scale(run_dir, layer, direction, norm)
    else:
        norm_info = {"source": "given (act_norm=)", "norm": "given"}
    scales = _scales(run_dir, layer, direction, norm_info.get("norm", "given"), act_norm)
    judge = make_fluency_judge(lm, tokenize_documents(lm.tokenizer, texts.prompts,
                                                      PROMPT_MAX_TOKENS),
                               texts.continuations, max_new_tokens=max_new_tokens, seed=seed,
                               batch_size=batch_size)
    score_range = SCORE_R_RANGE
    if calibrate:
        unit = direction["raw_norm"]
        if calibration is None:
            calibration = calibrate_steering(lm, layer, w, unit, texts.prompts,
                                             search_rs=calibration_rs, saturation=saturation,
                                             fluency_floor=fluency_floor,
                                             max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, seed=seed,
                                             fluency_judge=judge, progress=progress)
        to_run = unit / act_norm  # DiffMean units -> this run's units
        rs = [round(r * to_run, 6) for r in calibrated_rs(calibration, rs)]
        score_range = [round(r * to_run, 6) for r in calibrated_rs(calibration, SCORE_R_RANGE)]
    recons: dict[str, Callable | None] = {}
    if "diffmean" in methods:
        recons["diffmean"] = None
    glp = None
    if "glp" in methods:
        from glp_jax.api import load

        glp = load(run_dir, step=step)
        recons.update(build_methods(["glp"], glp=glp, layer=layer, glp_seed=seed,
                                    sigma0=sigma0, steps=steps, convention=convention))
    for b in baselines:
        rec = load_reconstructor(b, sigma0=sigma0, steps=steps, convention=convention,
                                 seed=seed)
        recons[_method_name(rec, set(recons))] = rec
    for rec in recons.values():
        fit_chunk(rec, batch_size)
    if not recons:
        raise GLPError("no steering method to run: methods= is empty and no baselines given")
    result = evaluate_steering(lm, layer, w, act_norm, texts.prompts, recons, rs=rs,
                               negative=negative, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, classifier=classifier, seed=seed,
                               progress=progress, fluency_judge=judge, zero_arm=zero_arm,
                               score_r_range=score_range, scales=scales)
    result["act_norm"].update(norm_info)
    result["calibration"] = dict(calibration) if calibrate else None
    result["direction"] = direction
    result["texts"] = texts.source
    result["run"] = str(run_dir)
    result["step"] = getattr(glp, "step", None)
    result["baselines"] = [str(b) for b in baselines]
    if write:
        out = Path(out_dir) if out_dir is not None else RunDir(run_dir) / EVALS_DIR
        out = Path(out) if isinstance(out, str) else out
        write_results(out, name, result, steer_markdown(result))
        plot_steer_pareto(result, out / PLOT_NAME.replace(RESULT_NAME, name), "positive")
        if negative:
            plot_steer_pareto(result, out / f"{name}_pareto_negative.png", "negative")
    return result
