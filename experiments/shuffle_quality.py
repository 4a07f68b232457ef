"""What the block shuffle costs statistically, on a real store (SmolLM2 layer 14, fortune).

1. Rows of one batch that share a document: the fraction of a batch's row pairs from the same
   document, exact global shuffle vs block shuffle (several sizes) vs its expectation under a
   uniform shuffle (sum_d n_d (n_d - 1) / (N (N - 1)) over the store's documents). Computed
   from the plans and the store's doc ids, without reading activations.
2. Held-out loss: the same small GLP trained with the exact and the block shuffle, `--seeds`
   seeds each (the seed changes initialisation, noise and shuffle: run-to-run noise), on
   `--activations` activations; val_loss curves to a PNG, final values to a Markdown table.

    .venv/bin/python experiments/shuffle_quality.py --train runs/reproduce/acts_train \
        --val runs/reproduce/acts_val --out runs/shuffle_quality
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from glp_jax.data.blocks import BlockPlan, same_document_pair_fraction
from glp_jax.data.pipeline import _Plan
from glp_jax.data.settings import BLOCK_ROWS, STREAMS, WINDOW_ROWS
from glp_jax.data.store import ActivationStore


def pair_fractions(store: ActivationStore, batch: int, n_batches: int,
                   blocks: list[tuple[int, int, int]], seed: int = 0) -> list[dict]:
    docs = store.doc_ids()
    n = docs.size
    _, counts = np.unique(docs, return_counts=True)
    uniform = float((counts * (counts - 1)).sum() / (n * (n - 1)))
    exact = _Plan(n, n, batch, batch, 0, n // batch, seed, True)
    rows = [{"shuffle": "uniform (expectation)", "fraction": uniform, "ratio": 1.0}]
    fr = [same_document_pair_fraction(docs[exact.examples_of(j)]) for j in range(n_batches)]
    rows.append({"shuffle": "exact global", "fraction": float(np.mean(fr)),
                 "ratio": float(np.mean(fr)) / uniform})
    for br, streams, window in blocks:
        plan = BlockPlan(n, br, streams, window, batch // streams, seed)
        fr = [same_document_pair_fraction(docs[plan.examples_of(j)])
              for j in range(min(n_batches, plan.batches))]
        rows.append({"shuffle": f"block {br} rows, {streams} streams, windows of {window}",
                     "fraction": float(np.mean(fr)), "ratio": float(np.mean(fr)) / uniform})
    return rows


def train_pair(train: str, val: str, out: Path, seeds: list[int], activations: int,
               extra: list[str]) -> dict:
    from glp_jax.config import load_config
    from glp_jax.rundir import read_metrics
    from glp_jax.train import train as run_train

    curves = {}
    for mode in ("exact", "block"):
        for seed in seeds:
            name = f"{mode}_s{seed}"
            cfg = load_config([f"train_dataset={train}", f"val_dataset={val}",
                               f"num_activations={activations}", f"seed={seed}",
                               f"data_shuffle={mode}", f"output_path={out / name}",
                               "data_mode=repeat", *extra])
            run_train(cfg)
            rows = [r for r in read_metrics(out / name / "metrics.jsonl") if "val_loss" in r]
            curves[name] = [(r["activations_seen"], r["val_loss"]) for r in rows]
    return curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default="runs/reproduce/acts_train")
    ap.add_argument("--val", default="runs/reproduce/acts_val")
    ap.add_argument("--out", default="runs/shuffle_quality")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--pair-batches", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--activations", type=int, default=1_048_576)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ActivationStore.open(args.train)
    blocks = list(dict.fromkeys([(BLOCK_ROWS, STREAMS, WINDOW_ROWS), (4096, 8, 16384),
                                 (1024, 8, 65536), (16384, 8, 65536), (4096, 1, 65536)]))
    pairs = pair_fractions(store, args.batch, args.pair_batches, blocks)
    print(f"# rows sharing a document, batch {args.batch}, {args.pair_batches} batches, "
          f"{len(store):,} rows of {args.train}")
    print("| shuffle | same-document pair fraction | vs uniform |\n|---|---|---|")
    for r in pairs:
        print(f"| {r['shuffle']} | {r['fraction']:.2e} | {r['ratio']:.2f} |")
    result = {"pairs": pairs}
    if not args.no_train:
        extra = ["n_layers=2", "d_model=256", "d_mlp=512", "batch_size=1024", "eval_rows=8192",
                 "learning_rate=1e-3", "eval_every_n_steps=64", "log_every_n_steps=64",
                 "save_every_n_steps=100000", "progress=false", "use_bf16=false"]
        seeds = [int(s) for s in args.seeds.split(",")]
        curves = train_pair(args.train, args.val, out, seeds, args.activations, extra)
        final = {m: [curves[f"{m}_s{s}"][-1][1] for s in seeds] for m in ("exact", "block")}
        result.update(curves=curves, final=final, settings=extra)
        print(f"\n# held-out loss after {args.activations:,} activations ({', '.join(extra[:4])}), "
              f"seeds {seeds}")
        print("| shuffle | final val_loss per seed | mean | std (run-to-run) |\n|---|---|---|---|")
        for m, v in final.items():
            print(f"| {m} | {', '.join(f'{x:.4f}' for x in v)} | {np.mean(v):.4f} | "
                  f"{np.std(v, ddof=1):.4f} |")
        diff = np.mean(final["block"]) - np.mean(final["exact"])
        noise = np.sqrt(np.var(final["block"], ddof=1) / len(seeds)
                        + np.var(final["exact"], ddof=1) / len(seeds))
        print(f"\nblock - exact: {diff:+.4f} (standard error of the difference {noise:.4f}, "
              f"{abs(diff) / noise:.1f} SE)")
        paired = np.subtract(final["block"], final["exact"])  # same seed: same init, val rows
        print(f"paired by seed: {', '.join(f'{d:+.4f}' for d in paired)} (mean {paired.mean():+.4f},"
              f" std {paired.std(ddof=1):.4f})")
        result["difference"] = {"block_minus_exact": float(diff), "standard_error": float(noise),
                                "paired_by_seed": paired.tolist()}
        _plot(curves, out / "shuffle_quality.png")
        print(f"plot: {out / 'shuffle_quality.png'}")
    (out / "shuffle_quality.json").write_text(json.dumps(result, indent=1))


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in sorted(curves.items()):
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, color="C0" if name.startswith("exact") else "C3", alpha=0.8,
                label=name.split("_")[0] if name.endswith("_s0") else None)
    ax.set_xlabel("activations seen")
    ax.set_ylabel("held-out loss (val_loss)")
    ax.set_yscale("log")
    ax.legend(title="shuffle")
    ax.set_title("exact vs block shuffle, same runs, several seeds")
    fig.tight_layout()
    os.makedirs(path.parent, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
