"""Local sweeps: depths x budgets x seeds run one after another in this process.

Clusters use `launch/sweep.sh` (same run names, one job per run). Every run writes
`<root>/d{depth}-a{activations}-s{seed}`; a finished run is skipped on rerun and an
interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glp_jax.config import load_config
from glp_jax.errors import GLPError
from glp_jax.rundir import RunDir
from glp_jax.train import train


@dataclass(frozen=True)
class SweepPlan:
    depths: tuple[int, ...]
    budgets: tuple[int, ...]  # activations per run (one cosine schedule each)
    seeds: tuple[int, ...] = (0,)
    # d_model per depth (d_mlp = mlp_ratio * d_model); None: the base config's widths. At
    # small scale width, not depth, sets how fast a GLP learns per activation, so a size
    # ladder that grows both spans capacity-limited to data-limited models.
    widths: tuple[int, ...] | None = None
    mlp_ratio: int = 2

    def __post_init__(self):
        if self.widths is not None and len(self.widths) != len(self.depths):
            raise GLPError(f"widths {self.widths} must give one d_model per depth "
                           f"{self.depths}")
        if len(set(self.depths)) != len(self.depths):
            raise GLPError(f"depths {self.depths} repeat; run names are d<depth>-a<budget>-s<seed>")

    def width_overrides(self, depth: int) -> list[str]:
        if self.widths is None:
            return []
        w = self.widths[self.depths.index(depth)]
        return [f"d_model={w}", f"d_mlp={self.mlp_ratio * w}"]

    def runs(self):
        for depth in self.depths:
            for budget in self.budgets:
                for seed in self.seeds:
                    yield depth, budget, seed


def run_name(depth: int, budget: int, seed: int) -> str:
    return f"d{depth}-a{budget}-s{seed}"


def _sweep_name(overrides: list[str], root: Path) -> list[str]:
    """Group the runs in trackers by the sweep folder's name unless the overrides name one."""
    if any(o.startswith("sweep_name=") for o in overrides):
        return []
    return [f"sweep_name={root.resolve().name}"]


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
        cfg = load_config([*overrides, *plan.width_overrides(depth), f"n_layers={depth}",
                           "num_steps=null",
                           f"num_activations={budget}", f"seed={seed}", f"output_path={out}",
                           *_sweep_name(overrides, root),
                           f"progress={str(progress).lower()}"])
        if progress:
            print(f"[sweep] {out.name}: {cfg.total_steps} steps of {cfg.batch_size}")
        train(cfg)
    return dirs
