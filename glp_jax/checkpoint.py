"""orbax checkpoints of a training run.

One manager, `checkpoints/<step>/` under the run directory, each step holding params,
optimizer state, data-iterator state and the resolved config (the RNG is the seed folded
with the step). Preservation keeps the last N steps (for resuming) plus the original's
log-spaced "epoch" steps forever (`epoch` recorded in the saved config). One manager, not
two: two async managers of one multi-process run deadlocked on orbax's barriers.
Saves are atomic (orbax writes a temporary folder and renames it when complete), so a run
killed mid-save restores from the previous complete checkpoint. Restores always go through
a sharded abstract target, so a checkpoint saved on N devices restores on M.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from glp_jax.errors import CheckpointError

ITEMS = ("state", "data", "config")


def run_path(path: str | Path) -> epath.Path:
    """Local paths made absolute; gs:// and other URLs kept as they are (etils epath)."""
    p = epath.Path(str(path))
    return p if "://" in str(path) else epath.Path(Path(str(path)).absolute())


class RunCheckpoints:
    def __init__(self, run_dir: str | Path, keep_last_n: int = 2, async_save: bool = True,
                 keep_steps: Sequence[int] = ()):
        self.run_dir = run_path(run_dir)
        policy = pp.AnyPreservationPolicy([pp.LatestN(n=max(1, keep_last_n)),
                                           pp.CustomSteps(list(keep_steps))])
        opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.run_dir / "checkpoints", item_names=ITEMS,
                                             options=opts)

    def save(self, step: int, state: Any, data_state: dict, config: dict,
             epoch: int | None = None, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave({**config, "_epoch": epoch}))
        self.manager.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        mgr = self.manager
        if step not in mgr.all_steps():
            raise CheckpointError(f"no complete checkpoint at step {step} in {mgr.directory}; "
                                  f"available: {list(mgr.all_steps())}")
        try:
            out = mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(
                f"checkpoint {mgr.directory}/{step} is corrupt or from an incompatible model "
                f"({e.__class__.__name__}: {str(e).splitlines()[0][:300]}). Delete that step "
                f"folder to resume from an earlier one, or start a new output_path.") from e
        return out.state, out.data, out.config

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (partial restore): sampling needs no optimizer state."""
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint at step {step} in "
                                  f"{self.manager.directory}; available: {self.all_steps()}")
        item = {"params": abstract_params}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise CheckpointError(
                f"checkpoint {self.manager.directory}/{step} is corrupt or from an incompatible "
                f"model ({e.__class__.__name__}: {str(e).splitlines()[0][:300]})") from e
        return out.state["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
