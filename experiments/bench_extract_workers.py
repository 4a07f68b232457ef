"""Extraction with 1 vs 2 workers into one logical store, measured in one script.

Each configuration runs real `glp extract` processes (SmolLM2 layer 14, fortune text) into
a fresh store of the same total rows; configurations alternate over `--repeats` so
background load hits them alike. Printed per configuration: extraction tokens/s = all
workers' LLM tokens / the longest worker's extraction seconds (model load excluded; the
workers start together), wall-clock rows/s from launch to the last exit (load included),
and the ratios against 1 worker.

    .venv/bin/python experiments/bench_extract_workers.py [--rows 3000] [--repeats 2]

Configurations: 1 worker with torch's default threads (= cores); 2 workers with 1 thread
each (OMP_NUM_THREADS=1: the cores split between them); 2 workers with default threads
(oversubscribed on a small machine).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

CONFIGS = {"1 worker": (1, None), "2 workers x 1 thread": (2, 1),
           "2 workers x default threads": (2, None)}


def run_config(workers: int, threads: int | None, rows: int, out: str, max_length: int):
    """Launch the workers at once; returns (tokens/s, wall rows/s, stored rows)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "glp_jax", "extract", "--corpus", "fortune", "--max-tokens",
           str(rows), "--max-length", str(max_length), "--out", out, "--quiet",
           "--workers", str(workers)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--worker", str(w)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    tokens, secs, stored = 0.0, 0.0, 0
    for p, (so, se) in zip(procs, outs, strict=True):
        if p.returncode:
            raise SystemExit(f"worker failed ({p.returncode}): {se.strip().splitlines()[-1]}")
        m = re.search(r": (\d+) rows .* (\d+) tokens/s over ([\d.]+) s", so)
        stored += int(m[1])
        tokens += float(m[2]) * float(m[3])
        secs = max(secs, float(m[3]))
    return tokens / secs, stored / wall, stored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}")
    tmp = tempfile.mkdtemp()
    res = {k: [] for k in CONFIGS}
    for r in range(args.repeats):
        for name, (workers, threads) in CONFIGS.items():
            out = f"{tmp}/{r}-{workers}-{threads}"
            res[name].append(run_config(workers, threads, args.rows, out, args.max_length))
            rate, wall, stored = res[name][-1]
            print(f"  repeat {r} {name}: {rate:.0f} tokens/s, {wall:.0f} rows/s wall, "
                  f"{stored} rows", flush=True)
    base_rate = max(x[0] for x in res["1 worker"])
    base_wall = max(x[1] for x in res["1 worker"])
    print("\n| configuration | extraction tokens/s (best) | ratio | wall rows/s (best) | ratio |")
    print("|---|---|---|---|---|")
    for name, xs in res.items():
        rate, wall = max(x[0] for x in xs), max(x[1] for x in xs)
        print(f"| {name} | {rate:.0f} | {rate / base_rate:.2f} | {wall:.0f} | "
              f"{wall / base_wall:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
