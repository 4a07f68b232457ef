"""Experiment trackers: TensorBoard events and an offline W&B run, read back with their own
readers, hold exactly metrics.jsonl's values per step, the run's hyper-parameters and its
sweep group; a resumed run appends to both (same W&B run id)."""

import glob
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_train_val
from wandb_records import wandb_records

from glp_jax.config import load_config
from glp_jax.errors import ConfigError
from glp_jax.sweep import _sweep_name
from glp_jax.tracking import SKIP, WANDB_ID_FILE

STEPS, BATCH = 60, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_train_val(tmp_path_factory.mktemp("track"), {"train": 2048, "val": 128})


def _config(store, out, *extra):
    return load_config([f"train_dataset={store / 'train'}", f"val_dataset={store / 'val'}",
                        "n_layers=1", "d_model=16", "d_mlp=32", f"batch_size={BATCH}",
                        f"num_steps={STEPS}", "data_mode=repeat", "use_bf16=false",
                        "learning_rate=3e-3", "log_every_n_steps=10", "eval_every_n_steps=20",
                        "eval_rows=64", "progress=false", f"output_path={out}",
                        "trackers=[jsonl,tensorboard,wandb]", "sweep_name=sw1", *extra])


def _items(entries):
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def test_tensorboard_and_wandb_hold_metrics_jsonl_and_a_resume_continues_them(
        store, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from glp_jax.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "sw1" / "d1-run"
    train(_config(store, out, "stop_at_step=30"))  # the first job stops at step 30 ...
    run_id = (out / WANDB_ID_FILE).read_text()
    train(_config(store, out))  # ... the rerun resumes to the end
    assert (out / WANDB_ID_FILE).read_text() == run_id
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
    run_json = json.loads((out / "run.json").read_text())
    params = run_json["run"]["params"]

    # TensorBoard: two event files (the resume appends one), every scalar of every row.
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    keys = [k for k, v in rows[-1].items() if k not in SKIP and isinstance(v, int | float)]
    assert {"loss", "val_loss", "lr", "grad_norm"} <= set(keys) <= set(ea.Tags()["scalars"])
    for k in keys:
        want = [(r["step"], np.float32(r[k])) for r in rows if k in r]
        got = [(e.step, np.float32(e.value)) for e in ea.Scalars(k)]
        assert got == want, k

    # W&B: both jobs wrote offline runs with the same id; together they hold every row.
    files = sorted(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / "*.wandb")))
    assert len(files) == 2
    history, summary, config = {}, {}, {}
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert (r.run.run_id, r.run.run_group, r.run.display_name) == (run_id, "sw1", "d1-run")
                config.update(_items(r.run.config.update))
            elif kind == "history":
                h = _items(r.history.item)
                history[h["_step"]] = h
            elif kind == "summary":
                summary.update(_items(r.summary.update))
    assert sorted(history) == [r["step"] for r in rows]
    for r in rows:
        for k in keys:
            if k in r:
                assert history[r["step"]][k] == r[k], (r["step"], k)
    assert summary["loss"] == rows[-1]["loss"] and summary["val_loss"] == rows[-1]["val_loss"]
    acts = STEPS * BATCH
    assert config["params"] == params and config["run.params"] == params
    assert config["compute_6nd"] == 6.0 * params * acts
    assert config["flops_exact"] == 3.0 * run_json["run"]["fwd_matmul_flops"] * acts
    assert (config["glp.d_model"], config["learning_rate"], config["sweep_name"]) == (16, 3e-3, "sw1")


def test_unknown_tracker_is_one_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(["trackers=[jsonl,tensorbord]"])
    assert "\n" not in str(e.value)
    assert "unknown tracker 'tensorbord'" in str(e.value) and "jsonl, tensorboard, wandb" in str(e.value)


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_missing_tracker_package_is_one_line_naming_pip_install(store, tmp_path, tracker, package):
    # A fresh interpreter in which the package cannot be imported (as if not installed).
    out = tmp_path / "run"
    code = (f"import sys; sys.modules[{package!r}] = None; from glp_jax.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", f"train_dataset={store / 'train'}",
                           "num_steps=2", f"output_path={out}", f"trackers=[jsonl,{tracker}]"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"glp: error: trackers includes {tracker}, which needs the "
                                   f"{package} package: pip install {package} (or drop {tracker} "
                                   f"from trackers)")
    assert not out.exists()  # refused before any work


def test_local_sweep_groups_its_runs_by_the_sweep_folder(tmp_path):
    assert _sweep_name(["config=x.yaml"], tmp_path / "sweeps" / "cpu") == ["sweep_name=cpu"]
    assert _sweep_name(["sweep_name=mine"], tmp_path / "cpu") == []
