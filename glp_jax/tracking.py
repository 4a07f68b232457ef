"""Experiment trackers beside metrics.jsonl: TensorBoard event files and Weights & Biases.

metrics.jsonl stays the record (`glp plot` and `glp fit` read only it); a tracker mirrors
each of its rows so people can browse runs and sweeps in TensorBoard or W&B. Chosen with
`trackers=[jsonl,tensorboard,wandb]` (jsonl is always written); only process 0 writes.

- tensorboard: event files in the run folder itself, so `tensorboard --logdir SWEEP_ROOT`
  lists a sweep's runs by folder name; the resolved config, parameter count and planned
  compute go to the HParams dashboard. A resumed run appends a new event file whose
  purge step drops events the interrupted run logged after its checkpoint.
- wandb: one W&B run per run folder (its id is kept in `wandb_run_id`, so a resumed run
  continues the same W&B run), grouped by `sweep_name`, with the same hyper-parameters.
  WANDB_MODE=offline works without network; WANDB_DIR picks where its files go (default:
  the run folder, or a temporary folder for bucket runs).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from typing import Any

from glp_jax.errors import ConfigError, GLPError
from glp_jax.rundir import write_atomic

PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
WANDB_ID_FILE = "wandb_run_id"
SKIP = ("step", "wall_time")  # the x axis, and a timestamp no float32 chart can hold


def require(name: str):
    """Import the package behind tracker `name`, or one line saying how to install it."""
    import importlib

    package = PACKAGES[name]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"trackers includes {name}, which needs the {package} package: "
                          f"pip install {package} (or drop {name} from trackers)") from None


def require_trackers(names: list[str]) -> None:
    """Every optional tracker's package is importable (checked before a run starts)."""
    for n in dict.fromkeys(names):
        if n in PACKAGES:
            require(n)


def scalars(row: dict) -> dict[str, float]:
    """The numeric values of a metrics row (not step or wall time, not strings)."""
    return {k: float(v) for k, v in row.items()
            if k not in SKIP and isinstance(v, int | float) and not isinstance(v, bool)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"glp": {"d_model": 16}} -> {"glp.d_model": 16}; lists and None as text (what
    TensorBoard's HParams accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def hyperparams(resolved: dict, total_steps: int, batch_size: int) -> dict[str, Any]:
    """The resolved config, flattened, plus the run's size and planned compute."""
    info = resolved.get("run", {})
    acts = total_steps * batch_size
    params = int(info.get("params", 0))
    return {**flatten(resolved), "params": params, "total_steps": total_steps,
            "total_activations": acts, "compute_6nd": 6.0 * params * acts,
            "flops_exact": 3.0 * float(info.get("fwd_matmul_flops", 0)) * acts}


class TensorBoardTracker:
    """Scalars per logged step into event files in the run folder."""

    def __init__(self, logdir: str, hparams: dict, start: int):
        tbx = require("tensorboard")
        # purge_step: on resume, events past the restored step (logged by the interrupted
        # run, redone now) are dropped by TensorBoard's reader.
        self.writer = tbx.SummaryWriter(logdir=logdir, purge_step=start + 1 if start else None,
                                        flush_secs=30)
        if not start:
            from tensorboardX.summary import hparams as hp_summary

            metrics = {"loss": math.nan, "val_loss": math.nan}
            for summary in hp_summary(hparams, metrics):
                self.writer._get_file_writer().add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(hparams, indent=1) + "\n```")

    def log(self, row: dict) -> None:
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, row["step"])
        self.writer.flush()  # rows are rare; a killed run keeps what metrics.jsonl keeps

    def close(self, preempted: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run folder; its id in the folder makes a resume continue it."""

    def __init__(self, run_dir, hparams: dict, name: str, group: str | None,
                 project: str, entity: str | None):
        wandb = require("wandb")
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run_id = secrets.token_hex(6)  # W&B ids: letters and digits
            write_atomic(id_file, run_id)
        local = "://" not in str(run_dir)
        directory = os.environ.get("WANDB_DIR") or (str(run_dir) if local else tempfile.mkdtemp())
        try:
            self.run = wandb.init(project=project, entity=entity, id=run_id, resume="allow",
                                  name=name, group=group, config=hparams, dir=directory)
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; all mean "not started"
            raise GLPError(f"wandb could not start ({str(e).splitlines()[0]}); run `wandb "
                           f"login`, set WANDB_MODE=offline, or drop wandb from trackers") from None

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self, preempted: bool = False) -> None:
        if preempted:
            self.run.mark_preempting()
        self.run.finish()


class Trackers:
    """The optional trackers of one run (none on processes other than 0)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, row: dict) -> None:
        for t in self.trackers:
            t.log(row)

    def close(self, preempted: bool = False) -> None:
        """Flush and finish every tracker once (later calls do nothing)."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close(preempted)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:  # an error on the way: still flush what was logged
        self.close()


def open_trackers(cfg, run, resolved: dict, start: int, primary: bool) -> Trackers:
    """The trackers cfg.trackers names, for the run in `run` (a RunDir) resumed at `start`."""
    names = [n for n in dict.fromkeys(cfg.trackers) if n != "jsonl"]
    if not primary or not names:
        return Trackers([])
    hp = hyperparams(resolved, cfg.total_steps, cfg.batch_size)
    name = cfg.run_name or run.path.name
    out = []
    if "tensorboard" in names:
        out.append(TensorBoardTracker(str(run.path), hp, start))
    if "wandb" in names:
        out.append(WandbTracker(run.path, hp, name, cfg.sweep_name, cfg.wandb_project,
                                cfg.wandb_entity))
    return Trackers(out)
