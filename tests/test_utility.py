"""Utility over checkpoints: probe AUC and steer score per kept checkpoint land in the run's
metrics.jsonl, merged with the training rows, and equal direct evaluations."""

import numpy as np
import pytest

from glp_jax.api import load
from glp_jax.config import make_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.evals.features import glp_method
from glp_jax.evals.probe import evaluate_probes
from glp_jax.evals.probe_data import fortune_tasks
from glp_jax.evals.utility import checkpoint_steps, utility_over_checkpoints
from glp_jax.rundir import read_metrics
from glp_jax.scaling import load_runs, metric_columns
from glp_jax.train import train

LAYER = 14


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    rng = np.random.default_rng(0)
    for name in ("train", "val"):
        s = ActivationStore.create(root / name, StoreMeta(
            model=smollm2.model_id, layers=[LAYER], d=smollm2.d, corpus="fortune"))
        s.append({LAYER: rng.standard_normal((96, smollm2.d)).astype(np.float32)},
                 np.zeros(96), np.arange(96))
    out = root / "sweep" / "d1"
    train(make_config(dict(train_dataset=str(root / "train"), val_dataset=str(root / "val"),
                           n_layers=1, d_model=32, d_mlp=64, batch_size=16, num_steps=4,
                           use_bf16=False, data_mode="repeat", log_every_n_steps=2,
                           save_every_n_steps=2, keep_last_n=5, eval_rows=16, epoch_size=32,
                           output_path=str(out), progress=False)))
    return out


def test_every_checkpoint_gets_its_metrics(smollm2, run):
    tasks = fortune_tasks(max_tasks=1, max_per_task=120)
    res = utility_over_checkpoints([run.parent], steer=True, tasks=tasks, lm=smollm2,
                                   sigma=0.5, progress=False,
                                   steer_kwargs=dict(n_prompts=2, rs=(1.2,), max_new_tokens=3,
                                                     n_direction=4))
    assert checkpoint_steps(run) == [2, 4]
    rows = res[str(run)]
    assert [r["step"] for r in rows] == [2, 4]
    merged = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    for r in rows:
        assert merged[r["step"]]["probe_auc_1d"] == r["probe_auc_1d"]
        assert "loss" in merged[r["step"]] and 0.0 <= r["steer_score"] <= 1.0
    # the stored AUC is what a direct evaluation of that checkpoint gives
    direct = evaluate_probes(tasks, [glp_method(load(run, step=2), sigma=0.5)], lm=smollm2,
                             layer=LAYER, dense=False, progress=False, max_length=128)
    assert rows[0]["probe_auc_1d"] == direct["auc_1d"]["glp"]["mean"]
    assert {"probe_auc_1d", "steer_score"} <= set(metric_columns(load_runs(run.parent)))
