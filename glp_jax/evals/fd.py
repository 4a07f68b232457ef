"""`glp eval fd`: Frechet distance of GLP samples (or a baseline's reconstructions) to real
held-out activations, in raw space (GLP_SPEC.md section 6, EVAL_PROTOCOL.md).

Reference sets. The real set is one token per held-out document of the val store (the
paper's "50k activations, one token per document"): a seeded random choice of documents,
then one seeded random row within each. A store without document ids (all equal, or -1 as
in imported original data) falls back to a seeded random subset of rows. The train
reference is the same selection on the train store with the same count, and
`fd_lower_bound` = FD(train reference, val reference): what two real samples of the same
distribution score, the floor any model can reach at this sample size.

Sources. A LoadedGLP generates n samples per step count (the same seed, so the same
starting noise, for every count); `fd` is the FD at `steps`. A Reconstructor (SAE, PCA,
identity; evals/recon.py) is scored by FD(reconstruct(train reference), val reference);
it has no steps axis, and the Identity reconstructor reproduces the lower bound exactly.

Estimates. `fd` is the plug-in FD of all rows (the paper's number), biased upward by ~b/n.
`fd_inf` is the bias-corrected FD (subsets extrapolated to 1/n -> 0) and `fd_inf_ci` its
interval from `replicates` disjoint replicate sets (evals/frechet.py, "bias-corrected FD");
`fd_estimate` holds the curve and the replicates, which pair with every other method's
scored against the same reference rows and seed (frechet.paired_difference). The lower
bound gets the same (`fd_lower_bound_inf`, ...).

Diagnostics (`diagnostics`): the share of held-out variance inside the span the GLP's
velocity can reach (`reachable_span`: 1.0 for d_model >= d; a narrow GLP never moves the
rest, which stays starting noise), and per-dimension variance of generated vs real rows
with the massive-activation dimensions named (`per_dim_variance`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError
from glp_jax.evals.frechet import (
    REPLICATES,
    FDResult,
    fd_estimates,
    frechet_gaussians,
    gaussian_fit,
)

DEFAULT_STEPS_LIST = (1, 2, 4, 10, 20, 50, 100, 250, 1000)
MASSIVE_RATIO = 10.0  # a dimension is "massive" when its real |mean| or sd is > this x the
# median RMS magnitude sqrt(mean^2 + var) over dimensions: SmolLM2-135M layer 14 gives dims
# 507 and 247 (|mean| ~75, 29x) by their mean and 308 (sd ~30, 11x) by its spread
WORST_DIMS = 5  # dimensions listed by |log variance ratio|
_SCAN_CHUNK = 1 << 22  # doc ids read per tensorstore call when scanning a store


# ----------------------------------------------------------------------------- stores
def stores_of_run(run_dir) -> tuple[ActivationStore, ActivationStore]:
    """(train store, val store) named in a training run's run.json. A run trained on a list
    of stores gives its first store as the train store."""
    from glp_jax.rundir import RunDir

    run = RunDir(run_dir)
    if not run.started():
        raise ConfigError(f"{run_dir} has no run.json (an original-format checkpoint folder?): "
                          f"it names no activation stores. Pass the stores explicitly: "
                          f"evaluate_fd(glp, train_store=..., val_store=...)")
    train, val = run.store_url("train_dataset"), run.store_url("val_dataset")
    if not val:
        raise ConfigError(f"run {run_dir} was trained without val_dataset, so there is no "
                          f"held-out store to measure FD against. Extract one (`glp extract "
                          f"--split val ...`) and pass it: evaluate_fd(..., val_store=PATH), "
                          f"or set val_dataset=PATH when training")
    if not train:
        raise ConfigError(f"run {run_dir}: run.json has no train_dataset; pass train_store=")
    return ActivationStore.open(train), ActivationStore.open(val)


def _open(store) -> ActivationStore:
    return store if isinstance(store, ActivationStore) else ActivationStore.open(str(store))


# ----------------------------------------------------------------------------- references
def _doc_runs(store: ActivationStore) -> tuple[np.ndarray, np.ndarray]:
    """(start row, doc id) of every run of equal consecutive doc ids, scanning in chunks."""
    n = len(store)
    starts, docs = [], []
    prev = None
    for a in range(0, n, _SCAN_CHUNK):
        ids = np.asarray(store.doc_ids(np.arange(a, min(a + _SCAN_CHUNK, n))), np.int64)
        change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        if prev is None or ids[0] != prev:
            change = np.concatenate([[0], change])
        starts.append(a + change)
        docs.append(ids[change])
        prev = ids[-1]
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(docs)


REFERENCES = ("per-doc", "random")


def reference_rows(store, n: int, seed: int = 0, stream: int = 0,
                   reference: str = "per-doc") -> tuple[np.ndarray, dict]:
    """Sorted row indices of a reference set of up to n rows, and a description.

    per-doc (the paper's): one random row of each of min(n, #documents) random documents
    when the store has document ids (at least two distinct, none negative); else, and for
    reference="random", min(n, rows) random rows (for stores that cover few documents).
    Deterministic in (seed, stream); stream separates the val (0) and train (1) draws.
    """
    if reference not in REFERENCES:
        raise ConfigError(f"reference must be one of {REFERENCES}, got {reference!r}")
    store = _open(store)
    total = len(store)
    if total < 2:
        raise ConfigError(f"store {store.url} holds {total} rows; FD needs at least 2")
    rng = np.random.default_rng([int(seed), int(stream)])
    starts, docs = _doc_runs(store)
    info = {"store": store.url, "store_rows": total, "requested": int(n), "seed": int(seed)}
    uniq, inv = np.unique(docs, return_inverse=True)
    if reference == "random" or len(uniq) < 2 or uniq[0] < 0:
        idx = np.sort(rng.choice(total, min(n, total), replace=False))
        why = "as asked" if reference == "random" else "the store has no document ids"
        return idx, {**info, "selection": f"random rows ({why})", "rows": int(len(idx)),
                     "documents": None}
    lengths = np.diff(np.append(starts, total))
    # Rows of document j, in run order: runs sorted by (doc, start); a document split over
    # several runs (interleaved writers) is still one document.
    order = np.lexsort((starts, inv))
    r_start, r_len, r_doc = starts[order], lengths[order], inv[order]
    r_cum_end = np.cumsum(r_len)
    r_cum_start = r_cum_end - r_len
    doc_len = np.bincount(r_doc, weights=r_len, minlength=len(uniq)).astype(np.int64)
    doc_off = np.concatenate([[0], np.cumsum(doc_len)[:-1]])
    k = min(n, len(uniq))
    chosen = rng.choice(len(uniq), k, replace=False)
    g = doc_off[chosen] + (rng.random(k) * doc_len[chosen]).astype(np.int64)
    run = np.searchsorted(r_cum_end, g, side="right")
    idx = np.sort(r_start[run] + (g - r_cum_start[run]))
    return idx, {**info, "selection": "one token per document", "rows": int(k),
                 "documents": int(len(uniq))}


# ----------------------------------------------------------------------------- evaluate
def evaluate_fd(source, *, val_store, train_store, n: int = 50_000, steps: int = 1000,
                steps_list=DEFAULT_STEPS_LIST, seed: int = 0, batch_size: int = 4096,
                out_dir=None, progress: bool = True, layer: int | None = None, mesh=None,
                check_sqrtm: bool = True, plot: bool = True, reference: str = "per-doc",
                replicates: int = REPLICATES, drop_massive: float | None = None) -> dict:
    """FD of `source` against the val reference set, with the train-vs-val lower bound.

    source: a `glp_jax.api.LoadedGLP` (n samples at every count of steps_list plus `steps`)
    or a Reconstructor (scored on its reconstruction of the train reference rows).
    val_store / train_store: ActivationStore or path. layer: the LLM layer (stores with
    several layers, multi-layer GLPs). out_dir: writes fd.json, fd.md and fd_pca.png.
    replicates >= 2: also the bias-corrected `fd_inf` with its interval `fd_inf_ci` from that
    many disjoint replicate sets (`fd_estimate`: curve, replicates, pairing key; the same
    for the lower bound); 0 skips them.
    drop_massive=k: leave out reference rows whose L2 norm exceeds k x the median norm of
    their set ("massive activations": SmolLM2 layer 14 has ~1 in 20,000 rows at 15-150x the
    median norm, and one such row in a few thousand dominates a Gaussian fit); the counts
    dropped are recorded. None (default, the paper's protocol) keeps every row.
    Returns a JSON-able dict (fd_by_steps keyed by int step count).
    """
    from glp_jax.api import LoadedGLP

    val_store, train_store = _open(val_store), _open(train_store)
    if val_store.d != train_store.d:
        raise ConfigError(f"val store d={val_store.d} but train store d={train_store.d}")
    is_glp = isinstance(source, LoadedGLP)
    if is_glp and source.config.d_input != val_store.d:
        raise ConfigError(f"the GLP models d={source.config.d_input} but the stores hold "
                          f"d={val_store.d} activations; pass the stores of its LLM layer")
    t_start = time.perf_counter()

    val_idx, val_info = reference_rows(val_store, n, seed, stream=0, reference=reference)
    train_idx, train_info = reference_rows(train_store, len(val_idx), seed, stream=1,
                                           reference=reference)
    val_ref = val_store.read_rows(val_idx, layer)
    train_ref = train_store.read_rows(train_idx, layer)
    if drop_massive is not None:
        val_ref, val_info = _drop_massive(val_ref, val_info, drop_massive)
        train_ref, train_info = _drop_massive(train_ref, train_info, drop_massive)
    val_fit = gaussian_fit(val_ref)
    train_fit = gaussian_fit(train_ref)
    lower = frechet_gaussians(*train_fit, *val_fit, check=check_sqrtm)
    sqrtm: dict = {"fd_lower_bound": lower.to_dict()}
    result: dict = {"seed": int(seed), "n_reference": int(len(val_idx)),
                    "reference": {"val": val_info, "train": train_info,
                                  "space": "raw (denormalised) activations",
                                  "layer": layer}}
    panels: dict[str, np.ndarray] = {}

    if is_glp:
        from glp_jax.evals.sampling import sample_activations

        counts = sorted({int(s) for s in steps_list} | {int(steps)})
        by_steps: dict[int, float] = {}
        rates: dict[int, dict] = {}
        sq_by: dict[int, dict] = {}
        for s in counts:
            gen, stats = sample_activations(source, n, s, seed=seed, batch_size=batch_size,
                                            mesh=mesh, layer=layer, progress=progress)
            res: FDResult = frechet_gaussians(*gaussian_fit(gen), *val_fit, check=check_sqrtm)
            by_steps[s], sq_by[s], rates[s] = res.fd, res.to_dict(), stats
            if s == int(steps):
                result.update(_estimate_fields(gen, train_ref, val_ref, replicates, seed))
                result["diagnostics"] = {
                    "span": reachable_span(source, val_ref, layer),
                    "per_dim": per_dim_variance(gen, val_ref)}
            if plot and out_dir is not None:  # samples are iid: the first rows will do
                panels[f"{s} step{'s' if s > 1 else ''}: FD {res.fd:.3g}"] = gen[:5000].copy()
            del gen
        main = rates[int(steps)]
        sqrtm.update(fd=sq_by[int(steps)], by_steps=sq_by)
        result.update(
            fd=by_steps[int(steps)], fd_by_steps=by_steps, steps=int(steps), n_generated=int(n),
            samples_per_s=main["samples_per_s"],
            sampling={s: {k: r[k] for k in ("samples_per_s", "forward_passes_per_s",
                                            "compile_s", "wall_s", "batch_size", "devices")}
                      for s, r in rates.items()},
            source={"kind": "glp", "run": source.source, "step": source.step,
                    "d_input": source.config.d_input, "n_layers": source.config.n_layers,
                    "d_model": source.config.width, "d_mlp": source.config.mlp_width,
                    "layer": layer})
    else:
        if not callable(source):
            raise ConfigError(f"source {source!r} is neither a LoadedGLP nor a Reconstructor")
        t0 = time.perf_counter()
        recon = np.asarray(source(train_ref), np.float32)
        dt = time.perf_counter() - t0
        if recon.shape != train_ref.shape:
            raise ConfigError(f"reconstructor {getattr(source, 'name', source)!r} returned "
                              f"shape {recon.shape} for input {train_ref.shape}")
        res = frechet_gaussians(*gaussian_fit(recon), *val_fit, check=check_sqrtm)
        sqrtm["fd"] = res.to_dict()
        result.update(_estimate_fields(recon, train_ref, val_ref, replicates, seed))
        result["diagnostics"] = {"per_dim": per_dim_variance(recon, val_ref)}
        describe = source.describe() if hasattr(source, "describe") else {}
        result.update(fd=res.fd, fd_by_steps=None, steps=None, n_generated=int(len(recon)),
                      samples_per_s=len(recon) / max(dt, 1e-9),
                      source={"kind": "reconstructor", **describe})
        if plot and out_dir is not None:
            panels[f"{describe.get('method', 'reconstruction')}: FD {res.fd:.3g}"] = recon
    all_checks = [lower.to_dict()] + ([sqrtm["fd"]] if not is_glp else
                                      list(sqrtm["by_steps"].values()))
    sqrtm["method"] = sorted({c["method"] for c in all_checks})
    sqrtm["all_agree"] = (all(bool(c["agree"]) for c in all_checks) if check_sqrtm else None)
    result.update(fd_lower_bound=lower.fd, sqrtm=sqrtm,
                  wall_s=time.perf_counter() - t_start)

    if out_dir is not None:
        from glp_jax.rundir import write_results

        out_dir = Path(out_dir)
        if panels:
            from glp_jax.evals.pca_plot import pca_panels

            label = "generated" if is_glp else "reconstructed"
            result["plot"] = {"file": "fd_pca.png", "panels": pca_panels(
                val_ref, panels, out_dir / "fd_pca.png", fake_label=label,
                real_label="real (val)", title=_title(result), seed=seed)}
        write_results(out_dir, "fd", result, fd_markdown(result))
    return result


def _drop_massive(rows: np.ndarray, info: dict, ratio: float) -> tuple[np.ndarray, dict]:
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    keep = norms <= ratio * np.median(norms)
    dropped = np.sort(norms[~keep])[::-1]
    return rows[keep], {**info, "rows": int(keep.sum()),
                        "dropped_massive": {"ratio": float(ratio), "rows": int((~keep).sum()),
                                            "norms": dropped.tolist(),
                                            "median_norm": float(np.median(norms))}}


def _estimate_fields(x_NxD: np.ndarray, train_ref: np.ndarray, val_ref: np.ndarray,
                     replicates: int, seed: int) -> dict:
    """fd_inf / fd_lower_bound_inf with intervals and estimates; {} when replicates == 0."""
    if not replicates:
        return {}
    try:
        est = fd_estimates({"fd": x_NxD, "lower": train_ref}, val_ref, replicates=replicates,
                           seed=seed)
    except ValueError as e:
        raise ConfigError(f"bias-corrected FD: {e} (replicates={replicates}; pass "
                          f"replicates=0 to skip it)") from None
    out = {}
    for key, name in (("fd", "fd"), ("lower", "fd_lower_bound")):
        e = est[key]
        out.update({f"{name}_inf": e.fd_inf, f"{name}_inf_ci": [e.low, e.high],
                    f"{name}_estimate": e.to_dict()})
    return out


# ----------------------------------------------------------------------------- diagnostics
def _stat_row(stat, pos) -> np.ndarray:
    a = np.asarray(stat, np.float64)
    return a if a.ndim == 1 else a[0 if pos is None else int(pos)]


def variance_share(x_NxD: np.ndarray, basis_RxD: np.ndarray) -> float:
    """Share of the (centred) variance of x inside the span of the orthonormal rows of
    basis: ||P (x - mean)||^2 / ||x - mean||^2."""
    c = np.asarray(x_NxD, np.float64)
    c = c - c.mean(0)
    total = float(np.sum(c * c))
    return float(np.sum((c @ basis_RxD.T) ** 2) / total) if total > 0 else float("nan")


def velocity_basis(glp) -> np.ndarray:
    """Orthonormal rows [r, d] spanning the directions the velocity can take in normalised
    space: v = LN(h) @ W + b with out_proj's kernel W [d_model, d], so v - b lies in W's row
    space, of rank r <= min(d_model, d) (GLP_SPEC.md section 2, "Rank")."""
    w = np.asarray(glp.model.out_proj.kernel[...], np.float64)
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    tol = s.max() * max(w.shape) * np.finfo(np.float32).eps  # the kernel is fp32 (or less)
    return vt[s > tol]


def reachable_span(glp, rows_NxD: np.ndarray, layer: int | None = None) -> dict:
    """Share of held-out variance inside the span the GLP's sampler can move.

    Euler sampling (and the on-manifold projection) adds sums of velocities to the starting
    noise, so only directions in the velocity's span (velocity_basis) are shaped; the rest
    stay noise plus a constant. `share_normalised`: of the rows' variance after the GLP's
    normaliser (the space the model works in); `share_raw`: of the raw rows' variance inside
    the same span mapped back (raw = std * z + mean, so the span becomes diag(std) W's row
    space). Both are 1 for a full-rank GLP (d_model >= d); a narrow one leaves
    1 - share unreachable."""
    basis = velocity_basis(glp)
    pos, _ = glp.layer_args(layer, 1)
    mean, std = _stat_row(glp.normalizer.mean, pos), _stat_row(glp.normalizer.std, pos)
    rows = np.asarray(rows_NxD, np.float64)
    d = rows.shape[1]
    raw_basis = np.linalg.qr((basis * std).T)[0].T if len(basis) else basis
    return {"rank": int(len(basis)), "d_input": int(d),
            "d_model": int(glp.model.out_proj.kernel.shape[0]),
            "share_normalised": variance_share((rows - mean) / std, basis),
            "share_raw": variance_share(rows, raw_basis), "rows": int(len(rows))}


def per_dim_variance(gen_NxD: np.ndarray, real_MxD: np.ndarray, *,
                     ratio: float = MASSIVE_RATIO, worst: int = WORST_DIMS) -> dict:
    """Per-dimension variance of generated (or reconstructed) vs real rows (raw space):
    the median ratio var_gen / var_real and its spread, the `worst` dimensions by
    |log ratio|, and the massive-activation dimensions (real |mean| or sd > `ratio` x the
    median RMS magnitude of a dimension: one scale in activation units for both, since the
    median |mean| alone is near 0), each with both variances and means."""
    g, r = np.asarray(gen_NxD, np.float64), np.asarray(real_MxD, np.float64)
    vg, vr = g.var(0, ddof=1), r.var(0, ddof=1)
    mg, mr = g.mean(0), r.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = vg / vr
        dev = np.abs(np.log(q))
    ok = np.isfinite(q)
    dev = np.where(np.isfinite(dev), dev, np.inf)

    def dim(j: int) -> dict:
        return {"dim": int(j), "var_ratio": float(q[j]), "var_real": float(vr[j]),
                "var_gen": float(vg[j]), "mean_real": float(mr[j]), "mean_gen": float(mg[j])}

    scale = ratio * np.median(np.sqrt(mr ** 2 + vr))
    big_var = np.sqrt(vr) > scale
    big_mean = np.abs(mr) > scale
    massive = []
    for j in np.flatnonzero(big_var | big_mean):
        why = [w for w, hit in (("variance", big_var[j]), ("mean", big_mean[j])) if hit]
        massive.append({**dim(j), "why": why})
    massive.sort(key=lambda m: -m["var_real"])
    return {"median_var_ratio": float(np.median(q[ok])) if ok.any() else float("nan"),
            "var_ratio_q10_q90": [float(v) for v in np.percentile(q[ok], [10, 90])]
            if ok.any() else [float("nan")] * 2,
            "share_within_2x": float(np.mean((q >= 0.5) & (q <= 2.0))),
            "worst": [dim(j) for j in np.argsort(-dev, kind="stable")[:worst]],
            "massive": massive, "massive_rule": f"real |mean| or sd > {ratio:g}x the median "
                                                f"RMS of a dimension"}


def _title(result: dict) -> str:
    src = result["source"]
    name = src.get("run") or src.get("method") or src.get("kind")
    return f"{name}: real vs {'generated' if src['kind'] == 'glp' else 'reconstructed'}, " \
           f"top-2 PCs (lower bound {result['fd_lower_bound']:.3g})"


def fd_markdown(result: dict) -> str:
    """A small Markdown report: steps | FD, the lower bound, and the reference sets."""
    src = result["source"]
    lines = [f"# Frechet distance ({src['kind']})", ""]
    if src["kind"] == "glp":
        lines += [f"Run `{src['run']}` step {src['step']}; {result['n_generated']:,} generated "
                  f"vs {result['n_reference']:,} real rows; seed {result['seed']}; "
                  f"{result['samples_per_s']:,.0f} samples/s at {result['steps']} steps.", "",
                  "| steps | FD |", "|---:|---:|"]
        for s, fd in result["fd_by_steps"].items():
            mark = " **(fd)**" if s == result["steps"] else ""
            lines.append(f"| {s} | {fd:.4f}{mark} |")
    else:
        lines += [f"Reconstructor `{src.get('method')}` on {result['n_generated']:,} train "
                  f"reference rows vs {result['n_reference']:,} val rows; seed "
                  f"{result['seed']}.", "", "| source | FD |", "|---|---:|",
                  f"| {src.get('method')} | {result['fd']:.4f} |"]
    lines.append(f"| lower bound (train vs val) | {result['fd_lower_bound']:.4f} |")
    lines.append("")
    for name in ("val", "train"):
        r = result["reference"][name]
        docs = f" of {r['documents']:,} documents" if r["documents"] else ""
        lines.append(f"- {name} reference: {r['rows']:,} rows, {r['selection']}{docs} "
                     f"(store `{r['store']}`, {r['store_rows']:,} rows)")
    sq = result["sqrtm"]
    lines.append(f"- tr sqrt(S1 S2): {', '.join(sq['method'])}; scipy sqrtm check agrees: "
                 f"{sq['all_agree']}")
    lines += estimate_markdown(result)
    lines += diagnostics_markdown(result.get("diagnostics") or {})
    if "plot" in result:
        lines += ["", f"![real vs generated, top-2 PCs]({result['plot']['file']})"]
    return "\n".join(lines) + "\n"


def estimate_markdown(result: dict) -> list[str]:
    """The bias-corrected FD of the source and the lower bound, beside the raw FDs."""
    est = result.get("fd_estimate")
    if not est:
        return []
    low = result["fd_lower_bound_estimate"]
    name = (f"generated, {result['steps']} steps" if result["source"]["kind"] == "glp"
            else "reconstructed")
    conf = f"{100 * est['confidence']:g}%"
    lines = ["", "## Bias-corrected FD", "",
             f"| | FD_inf [{conf} CI] | raw FD (all rows) | estimated bias of the raw FD |",
             "|---|---:|---:|---:|"]
    for label, e in ((name, est), ("lower bound (train vs val)", low)):
        lines.append(f"| {label} | {e['fd_inf']:.4g} [{e['low']:.4g}, {e['high']:.4g}] | "
                     f"{e['fd_raw']:.4g} | {e['bias']:+.4g} |")
    rows = np.asarray(est["replicate_rows"])

    def span(a):
        return f"{a.min():,}" if a.min() == a.max() else f"{a.min():,}-{a.max():,}"

    lines += ["", f"FD_inf: FD of random subsets at fractions "
              f"{', '.join(f'{f:.3g}' for f in est['fractions'])} of the rows, extrapolated "
              f"linearly in 1/N to 1/N -> 0 (Chong & Forsyth 2020). Interval: t over "
              f"{len(rows)} disjoint replicate sets ({span(rows[:, 0])} rows vs "
              f"{span(rows[:, 1])} reference rows each), centred on FD_inf; paired with "
              f"every method scored against the same reference rows and seed."]
    for e in (est, low):
        if e.get("warning"):
            lines.append(f"Warning: {e['warning']}.")
            break
    return lines


def diagnostics_markdown(diag: dict) -> list[str]:
    """The reachable-span share and the per-dimension variance table."""
    if not diag:
        return []
    lines = ["", "## Diagnostics", ""]
    span = diag.get("span")
    if span:
        lines.append(f"- Reachable span: the velocity's directions have rank {span['rank']} "
                     f"of d = {span['d_input']} (d_model {span['d_model']}); held-out "
                     f"variance inside them: {span['share_normalised']:.4f} normalised, "
                     f"{span['share_raw']:.4f} raw (1 = every direction can be shaped; the "
                     f"rest stays starting noise).")
    pd = diag.get("per_dim")
    if pd:
        q10, q90 = pd["var_ratio_q10_q90"]
        lines += [f"- Per-dimension variance, generated / real: median "
                  f"{pd['median_var_ratio']:.3g} (10-90%: {q10:.3g}-{q90:.3g}), "
                  f"{100 * pd['share_within_2x']:.0f}% of dimensions within 2x. Massive "
                  f"dimensions ({pd['massive_rule']}): "
                  + (", ".join(str(m["dim"]) for m in pd["massive"]) or "none") + ".", "",
                  "| dimension | listed as | real var | generated var | ratio | real mean | "
                  "generated mean |", "|---:|---|---:|---:|---:|---:|---:|"]
        listed = [(m, "massive (" + ", ".join(m["why"]) + ")") for m in pd["massive"]]
        listed += [(w, "worst ratio") for w in pd["worst"]]
        for m, why in listed:
            lines.append(f"| {m['dim']} | {why} | {m['var_real']:.4g} | {m['var_gen']:.4g} | "
                         f"{m['var_ratio']:.3g} | {m['mean_real']:.4g} | {m['mean_gen']:.4g} |")
    return lines
