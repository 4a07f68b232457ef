"""Memory plan of every paper config on the meshes the launchers use (BENCHMARKS.md).

Each config is planned by `glp config check CONFIG --mesh ... --json` in its own process
(the simulated device count is fixed when JAX starts); per device, GiB.

    .venv/bin/python experiments/memory_plans.py [--meshes 1x1,8x1,2x4,1x8]
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys

from glp_jax.memplan import TARGETS, USABLE, GiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="experiments/paper/glp-*.yaml")
    ap.add_argument("--meshes", default="1x1,8x1,2x4,1x8")
    args = ap.parse_args()
    meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]
    mesh_args = [a for d, f in meshes for a in ("--mesh", f"data={d},fsdp={f}")]
    print(f"Per device, GiB; fits = total within {USABLE:.0%} of "
          + ", ".join(f"{k} ({v[1] / GiB:.1f} GiB)" for k, v in TARGETS.items()) + ".\n")
    print("| config | params | mesh data x fsdp | micro-batch/device | params | optimizer | "
          "temporaries | total | fits | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(args.configs)):
        out = subprocess.run([sys.executable, "-m", "glp_jax", "config", "check",
                              f"config={path}", *mesh_args, "--json"], capture_output=True,
                             text=True)
        if out.returncode:
            print(f"| {path} | failed: {out.stderr.strip()[:200]} |")
            continue
        for p in json.loads(out.stdout)["plans"]:
            fits = ", ".join(t for t, ok in p["fits"].items() if ok) or "none"
            print(f"| {path.split('/')[-1]} | {p['params'] / 1e9:.2f}B | {p['mesh'][0]} x "
                  f"{p['mesh'][1]} | {p['micro_batch_per_device']} | "
                  f"{p['param_bytes'] / GiB:.2f} | {p['opt_bytes'] / GiB:.2f} | "
                  f"{p['temp_bytes'] / GiB:.2f} | {p['total_bytes'] / GiB:.2f} | {fits} | "
                  f"{p['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
