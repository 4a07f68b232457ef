"""orbax checkpoints of a training run.

Two managers under the run directory:
    checkpoints/<step>/   keep-last-N, for resuming: params, optimizer state, step, RNG,
                          data-iterator state and the resolved config (async saves)
    epochs/<step>/        the original's log-spaced "epoch" checkpoints (kept forever),
                          same items; `epoch` (in units of epoch_size activations) in metadata
Saves are atomic (orbax writes a temporary folder and renames it when complete), so a run
killed mid-save restores from the previous complete checkpoint. Restores always go through
a sharded abstract target, so a checkpoint saved on N devices restores on M.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from glp_jax.errors import CheckpointError

ITEMS = ("state", "data", "config")


def run_path(path: str | Path) -> epath.Path:
    """Local paths made absolute; gs:// and other URLs kept as they are (etils epath)."""
    p = epath.Path(str(path))
    return p if "://" in str(path) else epath.Path(Path(str(path)).absolute())


def _manager(path: epath.Path, keep: int | None, async_save: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    return ocp.CheckpointManager(path, item_names=ITEMS, options=opts)


class RunCheckpoints:
    def __init__(self, run_dir: str | Path, keep_last_n: int = 2, async_save: bool = True):
        self.run_dir = run_path(run_dir)
        self.latest = _manager(self.run_dir / "checkpoints", keep_last_n, async_save)
        self.epochs = _manager(self.run_dir / "epochs", None, async_save)

    def save(self, step: int, state: Any, data_state: dict, config: dict,
             epoch: int | None = None, force: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave({**config, "_epoch": epoch}))
        mgr = self.epochs if epoch is not None else self.latest
        mgr.save(step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def all_steps(self, which: str = "latest") -> list[int]:
        return list((self.latest if which == "latest" else self.epochs).all_steps())

    def restore(self, step: int, abstract_state: Any, which: str = "latest") -> tuple[Any, dict, dict]:
        mgr = self.latest if which == "latest" else self.epochs
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

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.epochs.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.epochs.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def read_saved_config(step_dir: Path) -> dict:
    path = step_dir / "config" / "metadata"
    if not path.exists():
        cands = list((step_dir / "config").glob("*"))
        if not cands:
            raise CheckpointError(f"{step_dir} has no saved config; the checkpoint is partial")
        path = cands[0]
    return json.loads(path.read_text())
