"""Benchmark: rows/s of the grain pipeline vs a numpy memmap read of the same rows.

Builds a bf16 ActivationStore of ~262k rows x d=576 (SmolLM2 width) in a temp dir, writes
the same bf16 data to a .npy, and reads identical batches of 4096 rows from both:
globally shuffled (the training case) and contiguous (in store order). The pipeline's
figures include normalising to float32; numpy is timed both raw (bf16 -> float32) and
with the same normalisation. Run: `.venv/bin/python experiments/bench_pipeline.py`.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import grain
import ml_dtypes
import numpy as np

from glp_jax.data.pipeline import PipelineConfig, build_pipeline
from glp_jax.data.store import ActivationStore, StoreMeta


def _build(root: str, rows: int, d: int, seed: int = 0) -> tuple[str, np.ndarray]:
    url = os.path.join(root, "store")
    store = ActivationStore.create(url, StoreMeta(model="bench", layers=[14], d=d))
    mm = np.lib.format.open_memmap(os.path.join(root, "acts.npy"), mode="w+", dtype=np.uint16,
                                   shape=(rows, d))
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 4.0, d).astype(np.float32)
    step = 32768
    for a in range(0, rows, step):
        x = (rng.standard_normal((min(step, rows - a), d), np.float32) * scale).astype(ml_dtypes.bfloat16)
        store.append({14: x}, np.zeros(len(x)), np.zeros(len(x)))
        mm[a:a + len(x)] = x.view(np.uint16)
    mm.flush()
    del mm
    return url, np.load(os.path.join(root, "acts.npy"), mmap_mode="r")


def _rate(fn, batches: int, batch: int, repeats: int = 3) -> float:
    """Median rows/s over `repeats` timed calls of fn (each reads `batches` batches)."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(batches * batch / (time.perf_counter() - t))
    return float(np.median(rates))


def _pipeline_rate(cfg: PipelineConfig, batches: int,
                   repeats: int = 3) -> tuple[float, list[np.ndarray]]:
    """Median rows/s over `repeats` windows of `batches` consecutive batches (repeat mode),
    and the row ids of the first window."""
    it = build_pipeline(cfg, 0, 1).make_iterator()
    next(it)  # warm: thread pool / worker start and the first read are not throughput
    windows = []

    def window():
        windows.append([np.array(next(it)["index"]) for _ in range(batches)])

    rate = _rate(window, batches, cfg.batch_size, repeats)
    it.close()
    it = None  # drop the iterator and its buffered batches
    gc.collect()  # release grain's shared-memory batches now, not at interpreter exit
    return rate, windows[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=24,
                    help="timed batches per window (3 windows per case, median)")
    ap.add_argument("--workers", type=int, default=2, help="also time grain worker processes")
    args = ap.parse_args()
    b, nb = args.batch, args.batches
    print(f"# pipeline benchmark: {args.rows} rows x d={args.d} bf16 zarr3 store "
          f"(shard 16384 rows, chunk 8 rows), batch {b}, median of 3 windows of {nb} batches, "
          f"{os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        url, mm = _build(root, args.rows, args.d)
        print(f"build: {time.perf_counter() - t:.1f} s (store + .npy)")
        store = ActivationStore.open(url)
        mean32 = store.mean(14).astype(np.float32)
        std32 = np.sqrt(store.var(14)).astype(np.float32)

        def np_read(rows):
            return mm[rows].view(ml_dtypes.bfloat16).astype(np.float32)

        def np_norm(rows):
            x = np_read(rows)
            x -= mean32
            x /= std32
            return x

        # ------------------------------------------------------------ shuffled
        base = dict(store=url, batch_size=b, mode="repeat", seed=0)
        sync, idx = _pipeline_rate(PipelineConfig(**base, num_threads=0, prefetch=0), nb)
        raw = _rate(lambda: [store.read_rows(i, 14) for i in idx], nb, b)
        npr = _rate(lambda: [np_read(i) for i in idx], nb, b)
        npn = _rate(lambda: [np_norm(i) for i in idx], nb, b)
        thr, _ = _pipeline_rate(PipelineConfig(**base, num_threads=2, prefetch=2), nb)
        results = [("pipeline, shuffled, no prefetch (num_threads=0)", sync),
                   ("pipeline, shuffled, 2 threads, prefetch 2 (default)", thr)]
        if args.workers:
            mp, _ = _pipeline_rate(PipelineConfig(**base, num_workers=args.workers), nb)
            results.append((f"pipeline, shuffled, {args.workers} worker processes", mp))
        results += [("store.read_rows only (one tensorstore read, same rows)", raw),
                    ("numpy memmap fancy index -> float32 (same rows)", npr),
                    ("numpy memmap fancy index -> float32 -> z-score (same rows)", npn)]
        print("\n## globally shuffled batches")
        for name, r in results:
            print(f"{name:62s} {r / 1e3:9.1f} k rows/s")
        print(f"ratio pipeline(default) / numpy raw:        {thr / npr:.2f}")
        print(f"ratio pipeline(default) / numpy + z-score:  {thr / npn:.2f}")

        # ------------------------------------------------------------ contiguous
        starts = [j * b for j in range(nb)]  # the batches the in-order pipeline reads
        craw = _rate(lambda: [store.read_range(a, a + b, 14) for a in starts], nb, b)
        cnp = _rate(lambda: [mm[a:a + b].view(ml_dtypes.bfloat16).astype(np.float32)
                             for a in starts], nb, b)
        cont, _ = _pipeline_rate(PipelineConfig(**base, shuffle=False), nb)
        print("\n## contiguous batches (shuffle=False)")
        for name, r in [("pipeline, in order, 2 threads, prefetch 2", cont),
                        ("store.read_range only", craw),
                        ("numpy memmap slice -> float32", cnp)]:
            print(f"{name:62s} {r / 1e3:9.1f} k rows/s")
        print(f"ratio pipeline / numpy slice:               {cont / cnp:.2f}")

        # ------------------------------------------------------------ index generation
        n = args.rows
        lit = grain.MapDataset.range(n).shuffle(seed=0).batch(b, drop_remainder=True)
        t = time.perf_counter()
        for j in range(4):
            lit[j]
        per_grain = (time.perf_counter() - t) / 4
        from glp_jax.data.pipeline import index_shuffle

        t = time.perf_counter()
        for j in range(nb):
            index_shuffle(np.arange(j * b, (j + 1) * b), n - 1, 0)
        per_vec = (time.perf_counter() - t) / nb
        print("\n## shuffled indices of one batch (same permutation)")
        print(f"grain range().shuffle().batch() per element:  {per_grain * 1e3:7.2f} ms/batch")
        print(f"vectorised index_shuffle (pipeline):          {per_vec * 1e3:7.2f} ms/batch")


if __name__ == "__main__":
    main()
