"""Benchmark: shuffled training batches, exact vs block shuffle, against the storage limit.

Builds a synthetic bf16 store (`--rows` x `--d`) and a .npy holding the same bytes, then in
one process measures, on batches of `--batch` rows:
  - the disk's sequential read rate (dd with O_DIRECT: the page cache cannot help);
  - the exact global shuffle (random 8-row chunk reads) and the block shuffle
    (glp_jax/data/blocks.py: whole blocks read contiguously, shuffled in memory windows);
  - a warm numpy memmap gathering the *same rows* the block pipeline produced, in the same
    order, to float32 and z-scored (the bar: block >= 0.5 of it);
  - the block shuffle with the page cache dropped before it (`--cold`, needs root): the
    case of a store larger than memory.
Each figure covers `--epochs` epochs (repeat mode), so every window's reads are timed.
Run: `.venv/bin/python experiments/bench_input.py [--d 2048 --rows 1048576] [--cold]`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

import ml_dtypes
import numpy as np

from glp_jax.data.pipeline import PipelineConfig, build_pipeline, z_normalize
from glp_jax.data.settings import WINDOW_ROWS
from glp_jax.data.store import ActivationStore, StoreMeta


def build(root: str, rows: int, d: int, chunk_rows: int, shard_rows: int,
          seed: int = 0) -> tuple[str, str]:
    """A store and a .npy (uint16 view of the same bf16 values); returns their paths."""
    url, npy = os.path.join(root, f"store_c{chunk_rows}"), os.path.join(root, "acts.npy")
    if os.path.exists(npy) and os.path.exists(url) and len(ActivationStore.open(url)) == rows:
        return url, npy  # --root: reuse what an earlier run built
    store = ActivationStore.create(url, StoreMeta(model="bench", layers=[0], d=d,
                                                  chunk_rows=chunk_rows, shard_rows=shard_rows))
    make_npy = not os.path.exists(npy)
    mm = (np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint16, shape=(rows, d))
          if make_npy else None)
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 4.0, d).astype(np.float32)
    step = max(1, (64 << 20) // (2 * d))
    for a in range(0, rows, step):
        x = (rng.standard_normal((min(step, rows - a), d), np.float32) * scale
             ).astype(ml_dtypes.bfloat16)
        store.append({0: x}, np.zeros(len(x)), np.arange(a, a + len(x)) // 64)
        if mm is not None:
            mm[a:a + len(x)] = x.view(np.uint16)
    if mm is not None:
        mm.flush()
    return url, npy


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read_rate(path: str) -> float | None:
    """Bytes/s of a sequential O_DIRECT read of `path` (dd), None if dd cannot."""
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"],
                         capture_output=True, text=True)
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out.stderr)
    return int(m[1]) / float(m[2]) if m else None


def pipeline_rows(cfg: PipelineConfig, batches: int) -> tuple[float, np.ndarray]:
    """(rows/s over `batches` batches after one warm-up batch, the row ids read)."""
    it = build_pipeline(cfg, 0, 1).make_iterator()
    next(it)
    t = time.perf_counter()
    rows = [next(it)["index"] for _ in range(batches)]
    rate = batches * cfg.batch_size / (time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    return rate, np.stack(rows)


def numpy_rows(npy: str, rows_BxN: np.ndarray, mean, std) -> float:
    """rows/s of a warm memmap gathering the same rows, in the same order, to z-scored fp32."""
    mm = np.load(npy, mmap_mode="r")
    for a in range(0, len(mm), 65536):  # warm: every page in memory
        np.asarray(mm[a:a + 65536]).sum()
    t = time.perf_counter()
    for r in rows_BxN:
        x = np.asarray(mm[r]).view(ml_dtypes.bfloat16)
        z_normalize(x, mean, std)
    return rows_BxN.size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--epochs", type=float, default=2.0, help="batches per figure: this many "
                    "epochs, so that window reads are inside the timing")
    ap.add_argument("--chunk-rows", default="8", help="store layouts to compare, e.g. 8,32")
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--block-rows", default="4096", help="e.g. 1024,4096,16384")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--window-rows", type=int, default=None, help="default: the library's")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many (interleaved)")
    ap.add_argument("--cold", action="store_true", help="also with the page cache dropped")
    ap.add_argument("--root", default=None, help="keep the data here (default: a temp dir)")
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="bench_input_")
    os.makedirs(root, exist_ok=True)
    chunks = [int(c) for c in args.chunk_rows.split(",")]
    blocks = [int(b) for b in args.block_rows.split(",")]
    args.batches = max(8, int(args.epochs * args.rows // args.batch))
    window = args.window_rows or WINDOW_ROWS
    t = time.perf_counter()
    stores = {c: build(root, args.rows, args.d, c, args.shard_rows) for c in chunks}
    npy = stores[chunks[0]][1]
    gib = args.rows * args.d * 2 / 2**30
    print(f"# input benchmark: {args.rows:,} rows x d={args.d} bf16 ({gib:.2f} GiB), shards of "
          f"{args.shard_rows} rows, batch {args.batch}, {args.batches} batches per figure (median of {args.repeats}), "
          f"{args.threads} read threads, {os.cpu_count()} CPU cores; block shuffle: {args.streams} "
          f"streams, windows of {window} rows")
    print(f"build: {time.perf_counter() - t:.1f} s")
    drop_caches()
    disk = disk_read_rate(npy)
    row_bytes = args.d * 2
    if disk:
        print(f"disk sequential read (dd O_DIRECT, 16 MiB):  {disk / 2**20:8.0f} MiB/s = "
              f"{disk / row_bytes / 1e3:8.1f} k rows/s")
    base = dict(batch_size=args.batch, mode="repeat", num_threads=args.threads,
                prefetch=args.threads, seed=0)
    def row(c, what, rate, ref):
        vs_disk = f"{rate * row_bytes / disk:.2f}" if disk else "n/a"
        print(f"| {c} | {what} | {rate / 1e3:,.1f} | {rate / ref:.2f} | "
              f"{rate * row_bytes / 2**20:,.0f} | {vs_disk} |")

    print("\n| store chunk rows | read path | k rows/s | vs numpy same rows | MiB/s | vs disk |")
    print("|---|---|---|---|---|---|")
    for c in chunks:
        url = stores[c][0]
        st = ActivationStore.open(url)
        mean, std = st.mean(0), np.sqrt(st.var(0))
        exact = np.median([pipeline_rows(PipelineConfig(store=url, **base),
                                         max(4, args.batches // 8))[0]
                           for _ in range(args.repeats)])
        for br in blocks:
            cfg = PipelineConfig(store=url, shuffle_mode="block", block_rows=br,
                                 streams=args.streams, window_rows=window, **base)
            rates, refs, colds = [], [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                rate, rows = pipeline_rows(cfg, args.batches)
                rates.append(rate)
                refs.append(numpy_rows(npy, rows, mean, std))
                if args.cold and drop_caches():
                    colds.append(pipeline_rows(cfg, args.batches)[0])
            ref = float(np.median(refs))
            row(c, f"block shuffle, blocks of {br}", float(np.median(rates)), ref)
            if colds:
                row(c, f"block shuffle, blocks of {br}, page cache dropped",
                    float(np.median(colds)), ref)
        row(c, "exact global shuffle", exact, ref)
        row(c, "numpy memmap, same rows as the block shuffle (warm)", ref, ref)
    if not args.root:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
