"""Run folder: evaluation rows merge with training rows; a torn last line is not fatal."""

import json

import pytest

from glp_jax.errors import GLPError
from glp_jax.rundir import RunDir, read_metrics


def test_added_metrics_merge_by_step_and_survive_a_torn_line(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    lines = [json.dumps({"step": 10, "loss": 2.0}), json.dumps({"step": 20, "loss": 1.5})]
    (run.path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 30, "lo')
    run.add_metrics([{"step": 20, "probe_auc_1d": 0.8}, {"step": 10, "probe_auc_1d": 0.7}])
    rows = read_metrics(run.path / "metrics.jsonl")
    assert rows == [{"step": 10, "loss": 2.0, "probe_auc_1d": 0.7},
                    {"step": 20, "loss": 1.5, "probe_auc_1d": 0.8}]
    with pytest.raises(GLPError, match="step"):
        run.add_metrics([{"probe_auc_1d": 0.5}])


def test_relative_store_paths_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """A run trained in PROJECT with train_dataset=runs/acts is found from elsewhere."""
    project = tmp_path / "project"
    (project / "runs" / "acts").mkdir(parents=True)
    run = RunDir(project / "runs" / "sweep" / "d1")
    run.path.mkdir(parents=True)
    (run.path / "run.json").write_text(json.dumps({"train_dataset": "runs/acts",
                                                   "val_dataset": ["gs://b/val", "x"]}))
    monkeypatch.chdir(tmp_path)
    assert run.store_url("train_dataset") == str(project / "runs" / "acts")
    assert run.store_url("val_dataset") == "gs://b/val"
    assert run.store_url("nothing") is None
    monkeypatch.chdir(project)  # where training ran: as given
    assert run.store_url("train_dataset") == "runs/acts"
