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
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError
from glp_jax.evals.frechet import FDResult, frechet_gaussians, gaussian_fit

DEFAULT_STEPS_LIST = (1, 2, 4, 10, 20, 50, 100, 250, 1000)
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
                n_boot: int = 0, drop_massive: float | None = None) -> dict:
    """FD of `source` against the val reference set, with the train-vs-val lower bound.

    source: a `glp_jax.api.LoadedGLP` (n samples at every count of steps_list plus `steps`)
    or a Reconstructor (scored on its reconstruction of the train reference rows).
    val_store / train_store: ActivationStore or path. layer: the LLM layer (stores with
    several layers, multi-layer GLPs). out_dir: writes fd.json, fd.md and fd_pca.png.
    n_boot > 0: also `fd_boot` (FD of that many bootstrap resamples of the generated and the
    reference rows, frechet.fd_bootstrap; paired across methods by `seed`) and `fd_ci`.
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
            if n_boot and s == int(steps):
                result.update(_bootstrap_fields(gen, val_ref, n_boot, seed))
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
        if n_boot:
            result.update(_bootstrap_fields(recon, val_ref, n_boot, seed))
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


def _bootstrap_fields(x_NxD: np.ndarray, ref_NxD: np.ndarray, n_boot: int, seed: int) -> dict:
    from glp_jax.evals.frechet import fd_bootstrap

    boot = fd_bootstrap(x_NxD, ref_NxD, n_boot, seed=seed)
    return {"fd_boot": boot.tolist(), "fd_ci": [float(np.percentile(boot, 2.5)),
                                                float(np.percentile(boot, 97.5))],
            "fd_boot_note": f"{n_boot} bootstrap resamples of generated and reference rows "
                            f"(reference resamples shared across methods with seed {seed})"}


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
    if "plot" in result:
        lines += ["", f"![real vs generated, top-2 PCs]({result['plot']['file']})"]
    return "\n".join(lines) + "\n"
