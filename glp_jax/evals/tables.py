"""The paper's Tables 1 and 2 over a set of runs: FD (lower bound, SAE, PCA, GLP per depth)
and delta LM loss (zero/mean ablation, PCA, SAE, GLP per depth), side by side.

`glp eval fd|delta-lm SWEEP` lands here: every GLP run under the folder is evaluated
(each writes its own <run>/evals/fd.*, or <out>/fd.* when it is the only run), SAE runs and
PCA folders count as baselines, and the table goes to <out>/table1.{json,md} or
<out>/delta_lm.{json,md} = <out>/table2.{json,md}. All runs must share one
train/val store pair (the first GLP run's), or the comparison would mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError
from glp_jax.evals.frechet import REPLICATES
from glp_jax.rundir import EVALS_DIR, RUN_FILE, RunDir, write_results


def find_targets(paths) -> tuple[list[Path], list[Path]]:
    """(GLP runs, baselines) among `paths`: run folders, sweep folders (searched for runs),
    SAE runs and PCA folders (baselines)."""
    from glp_jax.pca import PCA_NPZ

    glps, baselines = [], []
    for p in map(Path, paths):
        if (p / PCA_NPZ).is_file():
            baselines.append(p)
            continue
        runs = [p] if (p / RUN_FILE).is_file() else sorted(f.parent for f in p.rglob(RUN_FILE))
        if not runs and (p / "config.yaml").is_file():
            runs = [p]  # an original-format GLP folder
        if not runs:
            raise GLPError(f"{p} holds no run (no {RUN_FILE} below it) and no PCA ({PCA_NPZ})")
        for r in runs:
            (baselines if run_kind(r) == "sae" else glps).append(r)
    return glps, baselines


def run_kind(run_dir: Path) -> str:
    if not (run_dir / RUN_FILE).is_file():
        return "glp"
    return RunDir(run_dir).resolved().get("model", "glp")


def glp_label(run_dir: Path) -> str:
    r = RunDir(run_dir).resolved()
    params = r.get("run", {}).get("params")
    size = f", {params / 1e6:.1f}M params" if params else ""
    return f"GLP d{r['glp']['n_layers']}{size}"


def baseline_label(method) -> str:
    desc = method.describe()
    if desc.get("method", "").startswith("pca"):
        return f"PCA k={desc['k']}"
    if desc.get("method") == "sae":
        return f"SAE k={desc['k']}, {desc['width']} latents"
    return desc.get("method", type(method).__name__)


def _depth(run_dir: Path) -> int:
    return int(RunDir(run_dir).resolved()["glp"]["n_layers"])


def _stores(glps, baselines, train_store=None, val_store=None):
    """(train, val) stores: given explicitly (original-format folders name none), else the
    first run's."""
    from glp_jax.evals.fd import _open, stores_of_run

    if train_store is not None and val_store is not None:
        return _open(train_store), _open(val_store)
    for r in [*glps, *baselines]:
        if (r / RUN_FILE).is_file():
            return stores_of_run(r)
    raise GLPError("no training run among the targets: pass at least one GLP or SAE run, "
                   "whose run.json names the train and val stores, or give both stores "
                   "(--train-store, --val-store)")


def depth_trend(depths: list[int], values: list[float]) -> dict:
    """Does the metric fall with depth? (the paper's headline for FD)"""
    from scipy.stats import spearmanr

    order = np.argsort(depths)
    v = np.asarray(values, np.float64)[order]
    out = {"monotone_decreasing": bool(np.all(np.diff(v) < 0)) if len(v) > 1 else None}
    if len(v) > 2:
        out["spearman_rho"] = float(spearmanr(np.asarray(depths)[order], v).statistic)
    return out


def fd_table(paths, *, n: int, steps: int, steps_list, seed: int = 0, pca_k: int = 32,
             out_dir=None, progress: bool = True, batch_size: int = 4096,
             reference: str = "per-doc", train_store=None, val_store=None,
             replicates: int = REPLICATES, drop_massive: float | None = None,
             name: str = "table1") -> dict:
    """Every row has the raw `fd` and, with replicates >= 2, the bias-corrected `fd_inf`,
    `fd_inf_ci` and `fd_estimate` (evaluate_fd). Every method is scored against the same
    reference rows and seed, so any two rows' replicates are paired
    (frechet.paired_difference). drop_massive: see evaluate_fd; `name` names the files
    written to `out_dir`."""
    from glp_jax.api import load
    from glp_jax.evals.fd import evaluate_fd
    from glp_jax.evals.recon import load_reconstructor

    glps, baselines = find_targets(paths)
    train_store, val_store = _stores(glps, baselines, train_store, val_store)
    common = dict(val_store=val_store, train_store=train_store, n=n, seed=seed,
                  progress=progress, batch_size=batch_size, reference=reference,
                  replicates=replicates, drop_massive=drop_massive)
    rows, res = [], None
    for b in baselines:
        method = load_reconstructor(b, pca_k=pca_k)
        res = evaluate_fd(method, **common, out_dir=_own(b, name), plot=False)
        rows.append({"method": baseline_label(method), "path": str(b), "fd": res["fd"],
                     **_estimate_fields(res)})
    for r in sorted(glps, key=_depth):
        alone = out_dir is not None and len(glps) == 1
        own = Path(out_dir) if alone else _own(r, name)
        res = evaluate_fd(load(r), **common, steps=steps, steps_list=steps_list, out_dir=own)
        rows.append({"method": glp_label(r), "path": str(r), "depth": _depth(r), "fd": res["fd"],
                     "fd_by_steps": res["fd_by_steps"], "samples_per_s": res["samples_per_s"],
                     **_estimate_fields(res),
                     "span_share": res["diagnostics"]["span"]["share_normalised"]})
        reference = res["reference"]
    if res is None:
        raise GLPError("nothing to evaluate")
    glp_rows = [x for x in rows if "depth" in x]
    result = {"fd_lower_bound": res["fd_lower_bound"],
              **{k: res[k] for k in ("fd_lower_bound_inf", "fd_lower_bound_inf_ci",
                                     "fd_lower_bound_estimate") if k in res},
              "rows": rows, "n": n, "steps": steps, "seed": seed, "replicates": replicates,
              "train_store": str(train_store.url), "val_store": str(val_store.url),
              "fd_vs_depth": depth_trend([x["depth"] for x in glp_rows],
                                         [fd_value(x) for x in glp_rows]) if glp_rows else None}
    if glp_rows:
        result["reference"] = reference
    result["drop_massive"] = drop_massive
    if drop_massive is not None:
        result["dropped_massive"] = {k: res["reference"][k].get("dropped_massive")
                                     for k in ("val", "train")}
    if out_dir is not None:
        write_results(Path(out_dir), name, result, fd_table_markdown(result))
    return result


def fd_value(row: dict) -> float:
    """The FD a row is judged by: bias-corrected where estimated, else the raw FD."""
    return row.get("fd_inf", row["fd"])


def _own(path: Path, name: str) -> Path:
    """Where one target's own FD files go: <target>/evals, or <target>/evals/<name> for a
    variant table, so the protocol's files are never overwritten."""
    own = Path(path) / EVALS_DIR
    return own if name == "table1" else own / name


def _estimate_fields(res: dict) -> dict:
    return {k: res[k] for k in ("fd_inf", "fd_inf_ci", "fd_estimate") if k in res}


def fd_table_markdown(result: dict) -> str:
    steps_cols = sorted({int(s) for x in result["rows"] for s in (x.get("fd_by_steps") or {})})
    est = "fd_lower_bound_inf" in result

    def inf(x: dict, key: str = "fd_inf") -> str:
        if not est:
            return ""
        if key not in x:
            return " |"
        lo, hi = x[f"{key}_ci"]
        return f" {x[key]:.4g} [{lo:.4g}, {hi:.4g}] |"

    head = ("| method |" + (" FD_inf [95% CI] |" if est else "") + " FD |"
            + "".join(f" {s} steps |" for s in steps_cols))
    lines = [f"Table 1: Frechet distance to held-out activations ({result['n']:,} samples, "
             f"{result['steps']} Euler steps for `FD`; lower is better)", "", head,
             "|---|---|" + "---|" * (len(steps_cols) + est),
             "| lower bound (train vs val) |" + inf(result, "fd_lower_bound_inf")
             + f" {result['fd_lower_bound']:.4g} |" + " |" * len(steps_cols)]
    for x in result["rows"]:
        by = x.get("fd_by_steps") or {}
        cells = "".join(f" {by[k]:.4g} |" if (k := _key(by, s)) is not None else " |"
                        for s in steps_cols)
        lines.append(f"| {x['method']} |{inf(x)} {x['fd']:.4g} |{cells}")
    if est:
        lines += ["", f"FD_inf: bias-corrected FD (FD of row subsets extrapolated linearly in "
                  f"1/N to 1/N -> 0) with a 95% t-interval over {result['replicates']} "
                  f"disjoint replicate sets; every method shares the reference groups, so "
                  f"differences pair by replicate. FD: the raw FD of all rows, biased upward "
                  f"by ~b/N."]
    spans = [(x["method"], x["span_share"]) for x in result["rows"] if "span_share" in x]
    if any(v < 1 - 1e-6 for _, v in spans):
        lines += ["", "Share of held-out variance inside the span a GLP's velocity can reach "
                  "(the rest is never shaped): " + "; ".join(f"{m}: {v:.3f}" for m, v in spans)
                  + "."]
    for k, d in (result.get("dropped_massive") or {}).items():
        if d:
            lines += ["", f"{k} reference: {d['rows']} row(s) with norm > {d['ratio']:g} x the "
                      f"median ({d['median_norm']:.4g}) left out: norms "
                      + ", ".join(f"{n:.4g}" for n in d["norms"])]
    trend = result.get("fd_vs_depth")
    if trend:
        what = "FD_inf" if est else "FD"
        rho = (f", Spearman rho(depth, {what}) = {trend['spearman_rho']:.2f}"
               if "spearman_rho" in trend else "")
        word = "falls" if trend["monotone_decreasing"] else "does not fall monotonically"
        lines += ["", f"{what} {word} with depth{rho}."]
    return "\n".join(lines) + "\n"


def _key(d: dict, s: int):
    for k in (s, str(s)):
        if k in d:
            return k
    return None


def delta_lm_table(paths, *, n_seqs: int, length: int, pca_k: int = 32, seed: int = 0,
                   sigma0: float = 0.5, steps: int = 20, convention: str = "code",
                   batch_size: int = 8, out_dir=None, progress: bool = True, lm=None) -> dict:
    """One LLM pass per method on the same held-out sequences: zero and mean ablation,
    every baseline, every GLP run's projection."""
    from glp_jax.api import load
    from glp_jax.evals.delta_lm import delta_lm_markdown, delta_lm_of_run
    from glp_jax.evals.recon import GLPProjection, load_reconstructor

    glps, baselines = find_targets(paths)
    anchor = (glps or baselines)[0]
    if not (anchor / RUN_FILE).is_file():
        raise GLPError("delta-lm needs a training run among the targets (for its store, LLM "
                       "and layer)")
    extra = {}
    for b in baselines:
        method = load_reconstructor(b, pca_k=pca_k)
        extra[baseline_label(method)] = method
    for r in sorted(glps, key=_depth):
        extra[glp_label(r)] = GLPProjection(load(r), sigma0=sigma0, steps=steps,
                                            convention=convention, seed=seed)
    result = delta_lm_of_run(anchor, methods=("zero", "mean"), extra_methods=extra,
                             n_seqs=n_seqs, length=length, batch_size=batch_size,
                             write=False, progress=progress, glp_seed=seed, lm=lm)
    glp_names = [glp_label(r) for r in sorted(glps, key=_depth)]
    if glp_names:
        result["delta_vs_depth"] = depth_trend([_depth(r) for r in sorted(glps, key=_depth)],
                                               [result["delta"][k] for k in glp_names])
    if out_dir is not None:  # delta_lm.json: the evaluation's own name; table2: the paper's
        write_results(Path(out_dir), "delta_lm", result, delta_lm_markdown(result))
        write_results(Path(out_dir), "table2", result, delta_lm_markdown(result))
    return result


def recon_table(paths, *, n: int, pca_k: int = 32, seed: int = 0, sigma0: float = 0.5,
                steps: int = 20, convention: str = "code", out_dir=None,
                reference: str = "per-doc", train_store=None, val_store=None) -> dict:
    """Reconstruction metrics of every baseline and GLP projection on the same held-out
    rows (the val reference set of `glp eval fd`)."""
    from glp_jax.api import load
    from glp_jax.evals.fd import reference_rows
    from glp_jax.evals.recon import GLPProjection, load_reconstructor
    from glp_jax.evals.recon_metrics import evaluate_recon, recon_markdown

    glps, baselines = find_targets(paths)
    if val_store is None:
        _, val_store = _stores(glps, baselines, train_store, val_store)
    else:
        from glp_jax.evals.fd import _open

        val_store = _open(val_store)
    idx, info = reference_rows(val_store, n, seed=seed, reference=reference)
    rows = val_store.read_rows(idx)
    methods = {}
    for b in baselines:
        method = load_reconstructor(b, pca_k=pca_k)
        methods[baseline_label(method)] = method
    for r in sorted(glps, key=_depth):
        methods[glp_label(r) + " projection"] = GLPProjection(
            load(r), sigma0=sigma0, steps=steps, convention=convention, seed=seed)
    result = {"methods": evaluate_recon(methods, rows), "n_rows": int(len(rows)),
              "reference": info, "val_store": str(val_store.url)}
    if out_dir is not None:
        write_results(Path(out_dir), "recon", result, recon_markdown(result))
    return result
