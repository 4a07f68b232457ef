"""Profile the GLP train step: a jax.profiler trace summarised by where the time goes.

Runs the step as `glp train` compiles it on a device-resident batch, records `--steps`
steps with jax.profiler (perfetto trace kept under --dir for Perfetto/TensorBoard), and
prints a Markdown table: matmuls (with their achieved GFLOP/s and the best library's at the
same shapes), elementwise work of the forward and backward passes, loss + optimizer, data
movement, loop control and executor time. Set XLA_FLAGS to compare compiler settings.

    .venv/bin/python experiments/profile_step.py [--d 576] [--n-layers 3] [--batch 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
from benchlib import glp_train_step, roofline

from glp_jax.profiling import markdown, summarize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--n-layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="trace folder (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--no-roofline", action="store_true")
    args = ap.parse_args()

    one, step, step_args, gcfg = glp_train_step(args.d, args.n_layers, args.batch)
    hlo = step.lower(*step_args()).compile().as_text()
    for _ in range(2):
        jax.block_until_ready(one())
    trace_dir = args.dir or tempfile.mkdtemp(prefix="glp-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(one())
    wall = (time.perf_counter() - t) / args.steps
    jax.profiler.stop_trace()
    summary = summarize(trace_dir, hlo, args.steps, wall)
    print(f"GLP d={args.d} d{args.n_layers}, batch {args.batch}, {jax.devices()[0].device_kind}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; trace in {trace_dir}")
    print(markdown(summary))
    if not args.no_roofline:
        roof = roofline(gcfg, args.batch)
        summary["roofline_ms"] = roof["best_s"] * 1e3
        mm = summary["categories"].get("matmul", {"ms": float("nan")})
        print(f"\nbest library at the step's matmul shapes: {roof['best_s'] * 1e3:,.1f} ms "
              f"({roof['flops'] / roof['best_s'] / 1e9:,.0f} GFLOP/s); the step's matmuls "
              f"took {mm['ms']:,.1f} ms of the step = {roof['best_s'] * 1e3 / mm['ms']:.2f} "
              f"of it; whole "
              f"step {roof['best_s'] / wall:.3f} of the roofline")
    print("\nslowest instructions:")
    for r in summary["slowest"]:
        print(f"  {r['ms']:8.1f} ms  {r['name']:<40} {r['category']:<45} {r['shape']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
