"""Local sweeps: depths x budgets x seeds run one after another in this process.

Clusters use `launch/sweep.sh` (same run names, one job per run). Every run writes
`<root>/d{depth}-a{activations}-s{seed}`; a finished run is skipped on rerun and an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glp_jax.config import load_config
from glp_jax.rundir import RunDir
from glp_jax.train import train


@dataclass(frozen=True)
class SweepPlan:
    depths: tuple[int, ...]
    budgets: tuple[int, ...]  # activations per run (one cosine schedule each)
    seeds: tuple[int, ...] = (0,)

    def runs(self):
        for depth in self.depths:
            for budget in self.budgets:
                for seed in self.seeds:
                    yield depth, budget, seed


def run_name(depth: int, budget: int, seed: int) -> str:
    return f"d{depth}-a{budget}-s{seed}"


def run_local_sweep(overrides: list[str], plan: SweepPlan, root: str | Path,
                    progress: bool = True) -> list[Path]:
    """Train every run of `plan` with the base `overrides` (config=FILE key=value ...)."""
    root = Path(root)
    dirs = []
    for depth, budget, seed in plan.runs():
        out = root / run_name(depth, budget, seed)
        dirs.append(out)
        if RunDir(out).finished():
            continue
        cfg = load_config([*overrides, f"n_layers={depth}", "num_steps=null",
                           f"num_activations={budget}", f"seed={seed}", f"output_path={out}",
                           f"progress={str(progress).lower()}"])
        if progress:
            print(f"[sweep] {out.name}: {cfg.total_steps} steps of {cfg.batch_size}")
        train(cfg)
    return dirs
