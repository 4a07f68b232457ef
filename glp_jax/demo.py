"""`make demo`: the main job on the embedded default (SmolLM2-135M layer 14, fortune text).

    1. extract layer-14 activations (train and held-out validation documents)
    2. a CPU scaling sweep: depths 1/2/4 at reduced widths, one cosine run each, validation
       loss at log-spaced steps (experiments/cpu/sweep.yaml)
    3. fit L(C) = E + A C^-alpha on the compute-efficient frontier, with bootstrap intervals
    4. plots (PNG)
    5. baselines on the same store: a TopK SAE (trained like the GLPs) and PCA
    6. utility vs compute: 1-D probe AUC of every kept checkpoint, fitted like the loss
    7. Table 1 (Frechet distance per depth, lower bound, SAE, PCA), Table 2 (delta LM loss
       per method), Table 4 (1-D and dense probing) and steering (concept vs fluency), at
       reduced sizes stated in the output
Each step is skipped when its output is already complete, so a rerun is quick. Sizes can
be changed with GLP_DEMO_* environment variables (see below).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from glp_jax.data.store import ActivationStore

DEMO_ROOT = Path(os.environ.get("GLP_DEMO_ROOT", "runs/demo"))
TRAIN_ROWS = int(os.environ.get("GLP_DEMO_TRAIN_ROWS", 60_000))
VAL_ROWS = int(os.environ.get("GLP_DEMO_VAL_ROWS", 6_000))
DEPTHS = tuple(int(x) for x in os.environ.get("GLP_DEMO_DEPTHS", "1 2 4").split())
BUDGET = int(float(os.environ.get("GLP_DEMO_ACTIVATIONS", 409_600)))
SAE_BUDGET = int(float(os.environ.get("GLP_DEMO_SAE_ACTIVATIONS", 102_400)))
FD_SAMPLES = int(os.environ.get("GLP_DEMO_SAMPLES", 2000))
FD_STEPS = 50
FD_STEPS_LIST = (1, 5, 20, 50)
DLM_SEQS = int(os.environ.get("GLP_DEMO_DLM_SEQS", 64))
DLM_LENGTH = 64
PROBE_TASKS = int(os.environ.get("GLP_DEMO_PROBE_TASKS", 3))
PROBE_ROWS, PROBE_MAX_LENGTH = 300, 128
STEER_PROMPTS = int(os.environ.get("GLP_DEMO_STEER_PROMPTS", 8))
STEER_RS = (0.4, 1.2, 2.0)
# Resolved like any config= (config.find_config_file).
SWEEP_CONFIG, SAE_CONFIG = "experiments/cpu/sweep.yaml", "experiments/cpu/sae.yaml"


def extract_demo_data(root: Path = DEMO_ROOT) -> dict[str, ActivationStore]:
    """Train and validation stores of SmolLM2 layer 14 on the fortune corpus."""
    from glp_jax.reproduce.steps import extract_stores

    return extract_stores(root, {"train": TRAIN_ROWS, "val": VAL_ROWS})


def train_baselines(stores: dict[str, ActivationStore], root: Path = DEMO_ROOT) -> dict[str, Path]:
    """The SAE (same pipeline, optimizer and checkpoints as the GLPs) and PCA baselines."""
    from glp_jax.reproduce import steps

    return steps.train_baselines(stores, root, sae_config=SAE_CONFIG, sae_activations=SAE_BUDGET)


def utility_vs_compute(sweep_dir: Path, tasks, inputs, lm) -> None:
    """Probe AUC (sigma 0.5) at every kept checkpoint, into each run's metrics.jsonl."""
    from glp_jax.evals.utility import PROBE_COLUMN, utility_over_checkpoints
    from glp_jax.scaling import load_runs

    if all(r.has_column(PROBE_COLUMN) for r in load_runs(sweep_dir)):
        return
    print(f"[demo] utility vs compute: 1-D probe AUC of every kept checkpoint on {len(tasks)} "
          f"fortune tasks (meta-neurons at sigma 0.5)")
    utility_over_checkpoints([sweep_dir], tasks=tasks, inputs=inputs, lm=lm, sigma=0.5)


def run_demo() -> int:
    from glp_jax.config import ExtractConfig
    from glp_jax.evals.delta_lm import delta_lm_markdown
    from glp_jax.evals.probe import probe_markdown, probe_run
    from glp_jax.evals.probe_data import fortune_tasks
    from glp_jax.evals.steer import steer_markdown, steer_run
    from glp_jax.evals.tables import delta_lm_table, fd_table, fd_table_markdown
    from glp_jax.evals.utility import task_inputs_once
    from glp_jax.llm.loading import load_causal_lm
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
    baselines = train_baselines(stores)
    timings["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    lm = load_causal_lm(ExtractConfig.model)
    layer = stores["train"].layers[0]
    tasks = fortune_tasks(max_tasks=PROBE_TASKS, max_per_task=PROBE_ROWS)
    inputs = task_inputs_once(tasks, lm, layer, mlp=True, max_length=PROBE_MAX_LENGTH)
    timings["probe inputs"] = time.perf_counter() - t
    t = time.perf_counter()
    utility_vs_compute(sweep_dir, tasks, inputs, lm)
    timings["utility"] = time.perf_counter() - t

    t = time.perf_counter()
    result = fit_sweep(sweep_dir, n_boot=200)
    write_results(sweep_dir, result)
    plots = plot_sweep(load_runs(sweep_dir), result, DEMO_ROOT / "plots")
    timings["fit+plots"] = time.perf_counter() - t

    t = time.perf_counter()
    evals_dir = DEMO_ROOT / "evals"
    targets = [sweep_dir, baselines["sae"], baselines["pca"]]
    # The demo's val store covers ~150 documents (fortunes are ~40 tokens): one token per
    # document would leave fewer reference rows than d, so the demo draws random rows.
    print(f"[demo] Table 1: FD of {FD_SAMPLES:,} samples per depth vs {FD_SAMPLES:,} random "
          f"held-out rows (reduced from the paper's 50,000 x 1,000 Euler steps, one token per "
          f"document, to {FD_SAMPLES:,} x {FD_STEPS} steps)")
    table1 = fd_table(targets, n=FD_SAMPLES, steps=FD_STEPS, steps_list=FD_STEPS_LIST,
                      out_dir=evals_dir, reference="random")
    timings["fd"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[demo] Table 2: delta LM loss on {DLM_SEQS} held-out sequences of {DLM_LENGTH} "
          f"tokens (reduced from the paper's 2,048 x 128)")
    table2 = delta_lm_table(targets, n_seqs=DLM_SEQS, length=DLM_LENGTH, out_dir=evals_dir,
                            lm=lm)
    timings["delta-lm"] = time.perf_counter() - t

    runs = load_runs(sweep_dir)
    best = min(runs, key=lambda r: float(np.nanmin(r.column("val_loss"))))
    t = time.perf_counter()
    print(f"[demo] Table 4: 1-D and dense probing on {len(tasks)} fortune tasks of <= "
          f"{PROBE_ROWS} texts (the paper: 113 SAE-Probes tasks), {best.name} vs raw, MLP "
          f"neurons, SAE, PCA")
    table4 = probe_run(best.path, baselines=[baselines["sae"], baselines["pca"]], tasks=tasks,
                       sigma=0.1, lm=lm, layer=layer, inputs=inputs,
                       max_length=PROBE_MAX_LENGTH, out_dir=evals_dir)
    timings["probe"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[demo] steering: {STEER_PROMPTS} neutral fortune prompts x 20 tokens, r = 0 and "
          f"r in {STEER_RS} rescaled so 2.0 = DiffMean's concept saturation (calibrated, in "
          f"DiffMean norms; each row also in mean-norm units; the paper: 100 prompts x r in "
          f"0.2..2.0 x the mean norm), diffmean / GLP / SAE")
    steer = steer_run(best.path, baselines=[baselines["sae"]], rs=STEER_RS,
                      n_prompts=STEER_PROMPTS, n_direction=64, lm=lm, out_dir=evals_dir,
                      norm="diffmean", calibrate=True)
    timings["steer"] = time.perf_counter() - t

    for md in (results_markdown(result), fd_table_markdown(table1), delta_lm_markdown(table2),
               probe_markdown(table4), steer_markdown(steer)):
        print("\n" + md)
    print("\n## Demo summary\n")
    print("| step | result |")
    print("|---|---|")
    for split, s in stores.items():
        print(f"| {split} activations | {len(s):,} rows x d={s.d}, layer {s.layers[0]} ({s.url}) |")
    vl = float(np.nanmin(best.column("val_loss")))
    print(f"| best model | {best.name} ({int(best.params):,} params), held-out loss {vl:.4f} |")
    print(f"| baselines | SAE {baselines['sae']}, PCA {baselines['pca']} |")
    print(f"| tables | {evals_dir}/table1.md, table2.md, probe.md, steer.md |")
    for p in [*plots, evals_dir / "steer_pareto.png"]:
        print(f"| plot | {p} |")
    print("| time | " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f", total {time.perf_counter() - t0:.0f} s |")
    return 0
