"""`make demo`: the main job on the embedded default (SmolLM2-135M layer 14, fortune text).

    1. extract layer-14 activations (train and held-out validation documents)
    2. a CPU scaling sweep: depths 1/2/4 at reduced widths, one cosine run each, validation
       loss at log-spaced steps (experiments/cpu/sweep.yaml)
    3. fit L(C) = E + A C^-alpha on the compute-efficient frontier, with bootstrap intervals
    4. plots (PNG)
    5. sample from the best model; Frechet distance of samples vs held-out activations
Each step is skipped when its output is already complete, so a rerun is quick. Sizes can
be changed with GLP_DEMO_* environment variables (see below).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from glp_jax.data.corpus import open_corpus
from glp_jax.data.store import ActivationStore

DEMO_ROOT = Path(os.environ.get("GLP_DEMO_ROOT", "runs/demo"))
TRAIN_ROWS = int(os.environ.get("GLP_DEMO_TRAIN_ROWS", 120_000))
VAL_ROWS = int(os.environ.get("GLP_DEMO_VAL_ROWS", 8_000))
DEPTHS = tuple(int(x) for x in os.environ.get("GLP_DEMO_DEPTHS", "1 2 4 8").split())
BUDGET = int(float(os.environ.get("GLP_DEMO_ACTIVATIONS", 614_400)))
SAMPLES = int(os.environ.get("GLP_DEMO_SAMPLES", 4000))
SWEEP_CONFIG = "experiments/cpu/sweep.yaml"  # resolved like any config= (config.find_config_file)


def extract_demo_data(root: Path = DEMO_ROOT) -> dict[str, ActivationStore]:
    """Train and validation stores of SmolLM2 layer 14 on the fortune corpus."""
    from glp_jax.config import ExtractConfig
    from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta
    from glp_jax.llm.loading import load_causal_lm

    corpus = open_corpus(ExtractConfig.corpus)
    stores, lm = {}, None
    for split, rows in (("train", TRAIN_ROWS), ("val", VAL_ROWS)):
        path = root / f"acts_{split}"
        if (path / "glp_store.json").exists():
            store = ActivationStore.open(path)
            if len(store) >= rows or store.cursor.get("exhausted"):
                stores[split] = store
                continue
        lm = lm or load_causal_lm(ExtractConfig.model)
        cfg = ExtractConfig(split=split).for_model(lm.n_layers)
        store = ActivationStore.open_or_create(path, extraction_meta(cfg, lm.model_id, lm.d,
                                                                     corpus.name))
        print(f"[demo] extracting {rows:,} {split} rows of layer {cfg.layers[0]} -> {store.url}")
        extract_to_store(Extractor(lm, cfg), corpus, store, rows)
        stores[split] = store
    return stores


def run_demo() -> int:
    from glp_jax.api import load
    from glp_jax.evals.frechet import frechet_distance
    from glp_jax.plots import plot_sweep
    from glp_jax.scaling import fit_sweep, load_runs, results_markdown, write_results
    from glp_jax.sweep import SweepPlan, run_local_sweep

    t0 = time.perf_counter()
    timings = {}
    stores = extract_demo_data()
    timings["extract"] = time.perf_counter() - t0

    t = time.perf_counter()
    sweep_dir = DEMO_ROOT / "sweep"
    overrides = [f"config={SWEEP_CONFIG}", f"train_dataset={stores['train'].url}",
                 f"val_dataset={stores['val'].url}"]
    print(f"[demo] sweep: depths {DEPTHS} x {BUDGET:,} activations -> {sweep_dir}")
    run_local_sweep(overrides, SweepPlan(DEPTHS, (BUDGET,)), sweep_dir)
    timings["sweep"] = time.perf_counter() - t

    t = time.perf_counter()
    result = fit_sweep(sweep_dir, n_boot=300)
    write_results(sweep_dir, result)
    md = results_markdown(result)
    plots = plot_sweep(load_runs(sweep_dir), result, DEMO_ROOT / "plots")
    timings["fit+plots"] = time.perf_counter() - t

    t = time.perf_counter()
    runs = load_runs(sweep_dir)
    best = min(runs, key=lambda r: float(np.nanmin(r.column("val_loss"))))
    glp = load(best.path)
    samples = glp.sample(SAMPLES, steps=100, seed=0)
    val, train_ref = (_random_rows(stores[k], SAMPLES, seed=i) for i, k in enumerate(("val", "train")))
    fd_samples = frechet_distance(samples, val)
    fd_floor = frechet_distance(train_ref, val)
    np.save(DEMO_ROOT / "samples.npy", samples)
    timings["sample+fd"] = time.perf_counter() - t

    print("\n" + md)
    print("\n## Demo summary\n")
    print("| step | result |")
    print("|---|---|")
    for split, s in stores.items():
        print(f"| {split} activations | {len(s):,} rows x d={s.d}, layer {s.layers[0]} ({s.url}) |")
    vl = float(np.nanmin(best.column("val_loss")))
    print(f"| best model | {best.name} ({int(best.params):,} params), held-out loss {vl:.4f} |")
    print(f"| samples | {SAMPLES} x 100 Euler steps -> {DEMO_ROOT / 'samples.npy'} |")
    print(f"| Frechet distance | samples vs val {fd_samples:.2f}; train vs val (floor) "
          f"{fd_floor:.2f}; |mu|^2+tr S of val {_fd_scale(val):.1f} |")
    for p in plots:
        print(f"| plot | {p} |")
    print("| time | " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f", total {time.perf_counter() - t0:.0f} s |")
    return 0


def _random_rows(store: ActivationStore, n: int, seed: int) -> np.ndarray:
    """n rows drawn uniformly (without replacement) from the whole store."""
    idx = np.random.default_rng(seed).choice(len(store), min(n, len(store)), replace=False)
    return store.read_rows(idx)


def _fd_scale(x: np.ndarray) -> float:
    """FD of x against a point mass at 0: puts FD numbers on a scale."""
    x = np.asarray(x, np.float64)
    return float(np.sum(x.mean(0) ** 2) + np.trace(np.cov(x, rowvar=False)))
