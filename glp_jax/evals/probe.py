"""1-D and dense probing (paper section 5.2, Table 4; GLP_SPEC.md section 6;
EVAL_PROTOCOL.md "1-D probing", "Dense probing").

1-D probing, per task and method:
1. prefilter: rank every feature by |mean_pos - mean_neg| over the raw (unstandardised)
   training rows, globally over all GLP blocks; keep the top `k` = 512 (stable order: ties
   keep the lower index);
2. per kept feature: StandardScaler + L2 LogisticRegressionCV(Cs = 10 log-spaced in
   [1e-5, 1], cv = 5 = StratifiedKFold without shuffling, scoring roc_auc, lbfgs,
   max_iter 1000, random_state 1); val = mean fold AUC at the chosen C;
3. the feature with the best val AUC wins (ties: the higher-ranked feature); report the
   test AUC of its refitted probe.

`impl="fast"` (default) computes step 2 without fitting anything. In one dimension the
fitted coefficient has the sign of the class-mean difference of its training rows (the
profile likelihood in w is concave with slope proportional to mean_pos - mean_neg at 0, and
the L2 penalty keeps the maximiser on that side), and AUC is invariant to increasing maps,
so every C gives the same AUC and the probe is exactly
    fold AUC = AUC(y_val, sign(mean diff on the fold's training part) * x_val),
    test AUC = AUC(y_test, sign(mean diff on all training rows) * x_test),
computed for all 512 features at once with tie-aware ranks. `impl="sklearn"` runs the
original's per-feature sklearn fits (the reference; tests assert they agree). One
corner differs in principle: a feature whose class means (nearly) coincide can leave lbfgs
at w = 0 (AUC 0.5) where the sign rule still orders the rows; such a feature cannot win.

Dense probing: StandardScaler + the same LogisticRegressionCV on all features of a method
(sklearn, no prefilter), test AUC of the refitted probe. For the GLP the paper's scaling
protocol is used by default (`dense_glp="per-block"`): one probe per block, the block with
the best val AUC wins; "concat" probes all blocks at once.

Aggregation: mean test AUC over tasks with a 95% percentile bootstrap CI (10,000
resamples) from scipy.stats.bootstrap with a fixed generator (default_rng(boot_seed));
the original passed no random state, so its CIs were not reproducible. With few tasks
(8-16) a percentile bootstrap under-covers, so a t-interval is given beside it (and shown
in the Markdown); comparisons between methods belong to paired tests over tasks
(evals/stats.paired_test, used by the reproduction's probing finding).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.evals import stats
from glp_jax.evals.run_llm import run_llm_and_layer
from glp_jax.progress import progress_bar

CS = np.logspace(-5, 0, 10)
N_FOLDS, TOP_K, N_BOOT, BOOT_SEED = 5, 512, 10_000, 0
LOGREG = dict(Cs=CS, scoring="roc_auc", solver="lbfgs", max_iter=1000, random_state=1)
RESULT_NAME = "probe"


# -- AUC and folds ------------------------------------------------------------------------------

def rank_auc(y, scores) -> np.ndarray:
    """ROC AUC of each column of `scores` [n, F] (or [n]) against binary y, ties counted as
    half (Mann-Whitney U / (n_pos n_neg)); equal to sklearn's roc_auc_score."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, np.float64)
    one = s.ndim == 1
    s = s[:, None] if one else s
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise GLPError("AUC needs both classes")
    ranks = rankdata(s, axis=0, method="average")
    auc = (ranks[y].sum(0) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return auc[0] if one else auc


def cv_folds(y, n_folds: int = N_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """What cv=5 means in LogisticRegressionCV for a classifier: StratifiedKFold, no shuffle."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y)
    return list(StratifiedKFold(n_folds).split(np.zeros((len(y), 1)), y))


def _mean_diff_sign(x, y) -> np.ndarray:
    y = y.astype(bool)
    d = x[y].mean(0, dtype=np.float64) - x[~y].mean(0, dtype=np.float64)
    return np.sign(d)


def prefilter(mean_diff, k: int = TOP_K) -> np.ndarray:
    """Indices of the k features with the largest |mean_pos - mean_neg|, best first (ties:
    lower index first)."""
    score = np.abs(np.nan_to_num(np.asarray(mean_diff, np.float64), nan=0.0))
    order = np.argsort(-score, kind="stable")
    return order[: min(k, len(order))]


# -- 1-D probes on a candidate matrix ------------------------------------------------------------

def probe_1d_fast(x_train, y_train, x_test, y_test, n_folds: int = N_FOLDS) -> dict:
    """val AUC (mean over folds) and test AUC [K] of a 1-D probe on every column (module
    docstring: exact equivalent of the sklearn pipeline)."""
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    y_train = np.asarray(y_train)
    folds = cv_folds(y_train, n_folds)
    fold_auc = np.stack([rank_auc(y_train[va], _mean_diff_sign(x_train[tr], y_train[tr])
                                  * x_train[va]) for tr, va in folds])
    test = rank_auc(y_test, _mean_diff_sign(x_train, y_train) * x_test)
    return {"val_auc": fold_auc.mean(0), "fold_auc": fold_auc, "test_auc": test}


def _logreg_cv(n_folds: int):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    return LogisticRegressionCV(cv=StratifiedKFold(n_folds), l1_ratios=(0,),
                                use_legacy_attributes=False, **LOGREG)


def _fit_logreg(x_train, y_train, x_test, y_test, n_folds: int) -> dict:
    """StandardScaler + LogisticRegressionCV: val = mean fold AUC at the chosen C."""
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = _logreg_cv(n_folds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # lbfgs convergence notes
        clf.fit(scaler.transform(x_train), y_train)
    scores = np.asarray(clf.scores_).reshape(n_folds, -1)  # [folds, Cs]
    c_idx = int(np.flatnonzero(np.isclose(clf.Cs_, clf.C_))[0])
    test = roc_auc_score(y_test, clf.predict_proba(scaler.transform(x_test))[:, 1])
    return {"val_auc": float(scores[:, c_idx].mean()), "fold_auc": scores[:, c_idx],
            "test_auc": float(test), "C": float(clf.C_)}


def probe_1d_sklearn(x_train, y_train, x_test, y_test, n_folds: int = N_FOLDS) -> dict:
    """The original's per-feature sklearn fits (slow reference of probe_1d_fast)."""
    fits = [_fit_logreg(np.asarray(x_train)[:, [j]], y_train, np.asarray(x_test)[:, [j]],
                        y_test, n_folds) for j in range(np.asarray(x_train).shape[1])]
    return {"val_auc": np.array([f["val_auc"] for f in fits]),
            "fold_auc": np.stack([f["fold_auc"] for f in fits], 1),
            "test_auc": np.array([f["test_auc"] for f in fits]),
            "C": np.array([f["C"] for f in fits])}


def probe_1d(feats, y_train, y_test, *, k: int = TOP_K, impl: str = "fast",
             n_folds: int = N_FOLDS) -> dict:
    """The 1-D probe of one task on a TaskFeatures (or a (x_train, x_test) pair): prefilter,
    per-feature probes, winner. Returns the winner's feature index, prefilter rank, val and
    test AUC (+ block/unit for a GLP)."""
    from glp_jax.evals.features import TaskFeatures

    if isinstance(feats, TaskFeatures):
        diff = feats.mean_diff(y_train)
        cand = prefilter(diff, k)
        xtr, xte = feats.matrix("train", cand), feats.matrix("test", cand)
        decode = feats.method.decode
    else:
        xtr_all, xte_all = (np.asarray(a, np.float32) for a in feats)
        y = np.asarray(y_train).astype(bool)
        diff = xtr_all[y].mean(0, dtype=np.float64) - xtr_all[~y].mean(0, dtype=np.float64)
        cand = prefilter(diff, k)
        xtr, xte = xtr_all[:, cand], xte_all[:, cand]
        decode = None
    if impl == "fast":
        res = probe_1d_fast(xtr, y_train, xte, y_test, n_folds)
    elif impl == "sklearn":
        res = probe_1d_sklearn(xtr, y_train, xte, y_test, n_folds)
    else:
        raise GLPError(f"impl must be fast or sklearn, got {impl!r}")
    best = int(np.argmax(res["val_auc"]))  # first maximum: the higher-ranked feature
    feature = int(cand[best])
    return {"feature": feature, "rank": best, "val_auc": float(res["val_auc"][best]),
            "test_auc": float(res["test_auc"][best]), "mean_diff": float(diff[feature]),
            "n_candidates": int(len(cand)), **(decode(feature) if decode else {})}


def dense_probe(x_train, y_train, x_test, y_test, n_folds: int = N_FOLDS) -> dict:
    """StandardScaler + LogisticRegressionCV on all columns (sklearn)."""
    t0 = time.perf_counter()
    res = _fit_logreg(np.asarray(x_train, np.float64), np.asarray(y_train),
                      np.asarray(x_test, np.float64), np.asarray(y_test), n_folds)
    res.pop("fold_auc")
    res["seconds"] = time.perf_counter() - t0
    res["n_features"] = int(np.asarray(x_train).shape[1])
    return res


def dense_probe_features(feats, y_train, y_test, *, dense_glp: str = "per-block") -> dict:
    """Dense probe of one method's TaskFeatures; a GLP per block (best val AUC) or concatenated."""
    m = feats.method
    if m.kind == "glp" and dense_glp == "per-block":
        H = m.block_size
        per_block = []
        for b in range(feats.n_features // H):
            cols = np.arange(b * H, (b + 1) * H)
            per_block.append(dense_probe(feats.matrix("train", cols), y_train,
                                         feats.matrix("test", cols), y_test))
        best = int(np.argmax([r["val_auc"] for r in per_block]))
        out = dict(per_block[best], block=best,
                   seconds=sum(r["seconds"] for r in per_block),
                   val_auc_per_block=[r["val_auc"] for r in per_block],
                   test_auc_per_block=[r["test_auc"] for r in per_block])
        return out
    if dense_glp not in ("per-block", "concat"):
        raise GLPError(f"dense_glp must be per-block or concat, got {dense_glp!r}")
    return dense_probe(feats.matrix("train"), y_train, feats.matrix("test"), y_test)


# -- aggregation ----------------------------------------------------------------------------------

def summarize(per_task: dict[str, float], *, n_resamples: int = N_BOOT,
              seed: int = BOOT_SEED) -> dict:
    """Mean over tasks with two 95% intervals: `ci_low`/`ci_high`, the paper's percentile
    bootstrap (stats.bootstrap_ci), and `t_low`/`t_high`, the t-interval (stats.t_interval),
    which covers better with few tasks. Both None with fewer than two tasks."""
    vals = list(per_task.values())
    lo = hi = t_lo = t_hi = None
    if len(vals) >= 2:
        lo, hi = stats.bootstrap_ci(vals, seed=seed, n_resamples=n_resamples)
        iv = stats.t_interval(vals)
        t_lo, t_hi = iv["low"], iv["high"]
    return {"mean": float(np.mean(vals)) if vals else None, "ci_low": lo, "ci_high": hi,
            "t_low": t_lo, "t_high": t_hi, "n_tasks": len(vals), "per_task": dict(per_task)}


# -- the evaluation -------------------------------------------------------------------------------

def evaluate_probes(tasks, methods, *, lm=None, layer: int | None = None, k: int = TOP_K,
                    dense: bool = True, dense_glp: str = "per-block", impl: str = "fast",
                    max_length: int = 512, batch_size: int = 32, n_boot: int = N_BOOT,
                    boot_seed: int = BOOT_SEED, cache_bytes: int | None = None,
                    progress: bool = True, out_dir=None, info: dict | None = None,
                    inputs: dict | None = None) -> dict:
    """Probe every task with every FeatureMethod (glp_jax.evals.features). Texts go through
    `lm` at `layer` once per task (last-token residual and MLP neurons); tasks with cached
    activations only feed methods that read the residual. `inputs`: {task name:
    task_inputs(...)} computed earlier (the LLM pass, reused across checkpoints). Writes
    probe.json/.md to `out_dir` when given."""
    from glp_jax.evals.features import CACHE_BYTES, TaskFeatures, task_inputs

    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise GLPError(f"method names must be unique, got {names}")
    if not tasks:
        raise GLPError("no probing tasks")
    need_mlp = any(m.source == "mlp" for m in methods)
    one_d = {m.name: {} for m in methods}
    dense_auc = {m.name: {} for m in methods}
    winners = {m.name: {} for m in methods}
    dense_info = {m.name: {} for m in methods}
    timing = {m.name: {"features_s": 0.0, "probe_1d_s": 0.0, "dense_s": 0.0} for m in methods}
    skipped: dict[str, list[str]] = {m.name: [] for m in methods}
    llm_s = 0.0
    t_start = time.perf_counter()
    for task in progress_bar(tasks, "probe tasks", "task", enabled=progress):
        t0 = time.perf_counter()
        task_in = (inputs or {}).get(task.name)
        if task_in is None or (need_mlp and "mlp" not in task_in):
            task_in = task_inputs(task, lm, layer, mlp=need_mlp, max_length=max_length,
                                  batch_size=batch_size)
        llm_s += time.perf_counter() - t0
        for m in methods:
            if m.source not in task_in:
                skipped[m.name].append(task.name)
                continue
            feats = TaskFeatures(m, task_in, task, cache_bytes or CACHE_BYTES)
            t0 = time.perf_counter()
            if feats.cache:  # features first, so the probe times below exclude them
                feats.matrix("train")
                feats.matrix("test")
            timing[m.name]["features_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            win = probe_1d(feats, task.y_train, task.y_test, k=k, impl=impl)
            timing[m.name]["probe_1d_s"] += time.perf_counter() - t0
            one_d[m.name][task.name] = win["test_auc"]
            winners[m.name][task.name] = win
            if dense:
                t0 = time.perf_counter()
                d = dense_probe_features(feats, task.y_train, task.y_test, dense_glp=dense_glp)
                timing[m.name]["dense_s"] += time.perf_counter() - t0
                dense_auc[m.name][task.name] = d["test_auc"]
                dense_info[m.name][task.name] = d
    result = {
        "auc_1d": {n: summarize(one_d[n], n_resamples=n_boot, seed=boot_seed) for n in names},
        "winners": winners,
        "methods": {m.name: m.describe() for m in methods},
        "tasks": [t.describe() for t in tasks],
        "settings": {"k": k, "impl": impl, "Cs": CS.tolist(), "folds": N_FOLDS,
                     "n_boot": n_boot, "boot_seed": boot_seed, "dense": dense,
                     "dense_glp": dense_glp, "max_length": max_length, "layer": layer,
                     "model": getattr(lm, "model_id", None), **(info or {})},
        "timing": {"llm_s": llm_s, "total_s": time.perf_counter() - t_start, **timing},
        "skipped": {n: s for n, s in skipped.items() if s},
    }
    if dense:
        result["auc_dense"] = {n: summarize(dense_auc[n], n_resamples=n_boot, seed=boot_seed)
                               for n in names}
        result["dense"] = dense_info
    if out_dir is not None:
        from glp_jax.rundir import write_results

        write_results(Path(out_dir), RESULT_NAME, result, probe_markdown(result))
    return result


def _cell(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    lo, hi = (s.get("t_low"), s.get("t_high")) if "t_low" in s else (s["ci_low"], s["ci_high"])
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
    return f"{s['mean']:.3f}{ci}"


def probe_markdown(result: dict) -> str:
    """The paper's Table 4 layout (method | 1-D AUC | dense AUC), then the GLP winners."""
    st = result["settings"]
    n_tasks = len(result["tasks"])
    lines = [f"Table 4: probing AUC over {n_tasks} binary task{'s' * (n_tasks != 1)} ({st.get('model') or 'LLM'}"
             f" layer {st.get('layer')}); mean test AUC [95% t-interval over tasks]", "",
             "| method | 1-D AUC | dense AUC |", "|---|---|---|"]
    dense = result.get("auc_dense", {})
    for name, desc in result["methods"].items():
        lines.append(f"| {desc.get('label', name)} | {_cell(result['auc_1d'][name])} | "
                     f"{_cell(dense.get(name))} |")
    lines += ["", f"1-D: top {st['k']} features by |mean_pos - mean_neg| on train, one "
              f"standardised L2 logistic regression per feature (C by {st['folds']}-fold CV "
              f"AUC), best CV AUC wins ({st['impl']} implementation). Dense: all features"
              + (", GLP per block (best CV AUC)" if st.get("dense_glp") == "per-block" else "")
              + f". Intervals: t over tasks (the percentile bootstrap of the paper, "
              f"{st['n_boot']} resamples, seed {st['boot_seed']}, is in probe.json as "
              f"ci_low/ci_high; it under-covers with few tasks)."]
    for name, desc in result["methods"].items():
        if desc.get("kind") != "glp" or not result["winners"][name]:
            continue
        lines += ["", f"Winning meta-neurons of {desc.get('label', name)} (sigma "
                  f"{desc.get('sigma')}):", "",
                  "| task | block | unit | val AUC | test AUC | dense block |", "|---|---|---|---|---|---|"]
        for task, w in result["winners"][name].items():
            db = result.get("dense", {}).get(name, {}).get(task, {}).get("block", "-")
            lines.append(f"| {task} | {w['block']} | {w['unit']} | {w['val_auc']:.3f} | "
                         f"{w['test_auc']:.3f} | {db} |")
    if result.get("skipped"):
        lines += ["", "Skipped (no texts for LLM features): "
                  + "; ".join(f"{n}: {len(s)} tasks" for n, s in result["skipped"].items())]
    t = result["timing"]
    lines += ["", f"Time {t['total_s']:.1f} s (LLM {t['llm_s']:.1f} s); per method "
              + ", ".join(f"{n} features {t[n]['features_s']:.1f} s / 1-D {t[n]['probe_1d_s']:.1f}"
                          f" s / dense {t[n]['dense_s']:.1f} s" for n in result["methods"]) + "."]
    return "\n".join(lines) + "\n"


# -- a trained run, end to end (what `glp eval probe RUN [BASELINES...]` calls) --------------

def build_methods(run_dir=None, baselines=(), *, glp=None, sigma: float = 0.1, seed: int = 0,
                  pca_k: int = 32, layer: int | None = None, raw: bool = True,
                  mlp: bool = True, step="latest") -> list:
    """raw, mlp, the run's GLP, then one method per baseline (SAE run, PCA folder, or another
    GLP run)."""
    from glp_jax.evals.features import glp_method, mlp_method, pca_method, raw_method, sae_method
    from glp_jax.pca import PCA, PCA_NPZ

    methods = ([raw_method()] if raw else []) + ([mlp_method()] if mlp else [])
    if glp is None and run_dir is not None:
        from glp_jax.api import load

        glp = load(run_dir, step=step)
    if glp is not None:
        methods.append(glp_method(glp, sigma=sigma, seed=seed, label=_glp_label(run_dir, glp),
                                  layer=layer))
    taken = {m.name for m in methods}

    def unique(name):
        out, i = name, 2
        while out in taken:
            out, i = f"{name}-{i}", i + 1
        taken.add(out)
        return out

    for b in baselines:
        b = Path(b)
        if (b / PCA_NPZ).is_file():
            m = pca_method(PCA.load(b), pca_k)
            m.name = unique(m.name)
        else:
            from glp_jax.api import LoadedGLP, load

            loaded = load(b)
            if isinstance(loaded, LoadedGLP):
                m = glp_method(loaded, sigma=sigma, seed=seed, name=unique("glp"),
                               label=_glp_label(b, loaded), layer=layer)
            else:
                m = sae_method(loaded, name=unique("sae"))
        m.info["path"] = str(b)
        methods.append(m)
    return methods


def _glp_label(run_dir, glp) -> str:
    if run_dir is not None and (Path(run_dir) / "run.json").is_file():
        from glp_jax.evals.tables import glp_label

        try:
            return glp_label(Path(run_dir))
        except (KeyError, TypeError):
            pass
    return f"GLP d{glp.config.n_layers}"


def probe_run(run_dir, baselines=(), tasks=None, *, sigma: float = 0.1, seed: int = 0,
              max_tasks: int | None = None, max_per_task: int | None = None, out_dir=None,
              progress: bool = True, dense: bool = True, dense_glp: str = "per-block",
              pca_k: int = 32, k: int = TOP_K, impl: str = "fast", layer: int | None = None,
              step="latest", lm=None, glp=None, device: str = "cpu", max_length: int = 512,
              batch_size: int = 32, n_boot: int = N_BOOT, boot_seed: int = BOOT_SEED,
              inputs: dict | None = None) -> dict:
    """Table 4 for a trained run: raw, MLP neurons, the run's GLP meta-neurons (sigma) and
    each baseline (SAE run, PCA folder), on `tasks` (None: the built-in fortune suite; or
    .csv/.jsonl files, original-layout folders, ProbeTask objects). The LLM and layer come
    from the run's training store (loaded fp32 unless `lm` is given). Writes
    probe.{json,md} to `out_dir` (default <run>/evals)."""
    from glp_jax.evals.probe_data import fortune_tasks, load_tasks
    from glp_jax.rundir import EVALS_DIR, RunDir

    # tasks, the run and its baselines are read before the (slower) LLM load
    task_list = (fortune_tasks(max_tasks=max_tasks, max_per_task=max_per_task)
                 if tasks is None else load_tasks(tasks))
    if max_tasks is not None:
        task_list = task_list[:max_tasks]
    if lm is None or layer is None:
        name, layer = run_llm_and_layer(run_dir, layer)
    methods = build_methods(run_dir, baselines, glp=glp, sigma=sigma, seed=seed, pca_k=pca_k,
                            layer=layer, step=step)
    if lm is None:
        from glp_jax.llm.loading import load_causal_lm

        lm = load_causal_lm(name, dtype="float32", device=device)
    if out_dir is None:
        out_dir = RunDir(run_dir) / EVALS_DIR
    result = evaluate_probes(task_list, methods, lm=lm, layer=layer, k=k, dense=dense,
                             dense_glp=dense_glp, impl=impl, max_length=max_length,
                             batch_size=batch_size, n_boot=n_boot, boot_seed=boot_seed,
                             progress=progress, out_dir=out_dir, inputs=inputs,
                             info={"run": str(run_dir), "sigma": sigma, "seed": seed,
                                   "baselines": [str(b) for b in baselines]})
    return result
