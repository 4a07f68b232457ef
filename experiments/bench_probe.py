"""Probing cost per task and method: LLM last-token pass, feature extraction, 1-D probe
(vectorised vs the original's per-feature sklearn fits), dense probe.

    HF_HUB_OFFLINE=1 python experiments/bench_probe.py [--run RUN] [--tasks 3]
        [--max-per-task 400] [--sklearn-features 16] [--no-dense]

Without --run, a random-init GLP of the CPU config's shape (SmolLM2-135M layer 14, d3,
d_mlp 1152: 3,456 meta-neurons) stands in: timings do not depend on the weights. The
sklearn 1-D probe is timed on the top `--sklearn-features` candidates and extrapolated to
512 (its cost is linear in the number of features); the two are checked to agree there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--max-per-task", type=int, default=400)
    ap.add_argument("--sklearn-features", type=int, default=16)
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args()

    from glp_jax.evals.features import TaskFeatures, glp_method, mlp_method, raw_method, task_inputs
    from glp_jax.evals.probe import (
        TOP_K,
        dense_probe_features,
        prefilter,
        probe_1d_fast,
        probe_1d_sklearn,
    )
    from glp_jax.evals.probe_data import fortune_tasks
    from glp_jax.llm.loading import load_causal_lm

    lm = load_causal_lm("smollm2")
    layer = args.layer
    if args.run:
        from glp_jax.api import load
        from glp_jax.evals.run_llm import run_llm_and_layer

        _, layer = run_llm_and_layer(args.run)
        glp = load(args.run)
    else:
        from flax import nnx

        from glp_jax.api import LoadedGLP
        from glp_jax.model import GLP, GLPConfig, Normalizer

        cfg = GLPConfig(d_input=lm.d, n_layers=3, d_model=576, d_mlp=1152).resolved()
        glp = LoadedGLP(GLP(cfg, rngs=nnx.Rngs(0)),
                        Normalizer.from_moments(np.zeros(lm.d), np.full(lm.d, 4.0)), cfg, [],
                        "random")
    methods = [raw_method(), mlp_method(), glp_method(glp, sigma=0.1)]
    tasks = fortune_tasks(max_tasks=args.tasks, max_per_task=args.max_per_task)
    rows = []
    for task in tasks:
        t0 = time.perf_counter()
        inputs = task_inputs(task, lm, layer, max_length=512)
        llm_s = time.perf_counter() - t0
        for m in methods:
            feats = TaskFeatures(m, inputs, task)
            t0 = time.perf_counter()
            feats.matrix("train")
            feats.matrix("test")
            feat_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cand = prefilter(feats.mean_diff(task.y_train), TOP_K)
            xtr, xte = feats.matrix("train", cand), feats.matrix("test", cand)
            fast = probe_1d_fast(xtr, task.y_train, xte, task.y_test)
            fast_s = time.perf_counter() - t0
            n_sk = min(args.sklearn_features, len(cand))
            t0 = time.perf_counter()
            ref = probe_1d_sklearn(xtr[:, :n_sk], task.y_train, xte[:, :n_sk], task.y_test)
            sk_s = (time.perf_counter() - t0) * len(cand) / n_sk
            agree = float(max(np.abs(ref["val_auc"] - fast["val_auc"][:n_sk]).max(),
                              np.abs(ref["test_auc"] - fast["test_auc"][:n_sk]).max()))
            dense_s = float("nan")
            if not args.no_dense:
                t0 = time.perf_counter()
                dense_probe_features(feats, task.y_train, task.y_test)
                dense_s = time.perf_counter() - t0
            best = int(np.argmax(fast["val_auc"]))
            rows.append((task.name, len(task.labels), m.name, feats.n_features, llm_s, feat_s,
                         fast_s, sk_s, sk_s / fast_s, agree, dense_s,
                         float(fast["test_auc"][best])))
            llm_s = 0.0  # count the LLM pass once per task

    head = ("| task | N | method | features | LLM s | features s | 1-D fast s | 1-D sklearn s "
            "(512, extrapolated) | speedup | max AUC diff | dense s | 1-D test AUC |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.3f} | "
              f"{r[7]:.0f} | {r[8]:,.0f}x | {r[9]:.1e} | {r[10]:.1f} | {r[11]:.3f} |")
    tot = {k: sum(r[i] for r in rows) for k, i in (("llm", 4), ("feat", 5), ("fast", 6),
                                                    ("sk", 7), ("dense", 10))}
    print(f"\n{len(tasks)} tasks x {len(methods)} methods: LLM {tot['llm']:.1f} s, features "
          f"{tot['feat']:.1f} s, 1-D fast {tot['fast']:.2f} s vs sklearn ~{tot['sk']:.0f} s "
          f"({tot['sk'] / tot['fast']:,.0f}x), dense {tot['dense']:.1f} s")


if __name__ == "__main__":
    main()
