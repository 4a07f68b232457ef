"""`glp reproduce` end to end on a tiny plan (real SmolLM2, real fortune text, a two-depth
sweep), the report built from it, and the verdict arithmetic against independent
computations (numpy, scipy, brute force)."""

import json
import math

import numpy as np
import pytest
import scipy.linalg

from glp_jax.cli import main
from glp_jax.errors import ConfigError, GLPError
from glp_jax.evals.frechet import fd_bootstrap
from glp_jax.reproduce import findings as F
from glp_jax.reproduce.plan import load_plan

TINY_SWEEP = """\
d_model: 32
d_mlp: 64
batch_size: 64
learning_rate: 3.0e-3
data_mode: repeat
use_bf16: false
log_every_n_steps: 10
eval_log_points: 6
eval_rows: 256
save_every_n_steps: 25  # 3 kept checkpoints a run (epoch 10, 25, 50): the utility step evaluates each
keep_last_n: 10
epoch_size: 640
progress: false
"""


def tiny_plan(tmp, **over):
    (tmp / "sweep.yaml").write_text(TINY_SWEEP)
    items = {"root": tmp / "repro", "report_dir": tmp / "report", "train_rows": 3000,
             "val_rows": 800, "sweep_config": tmp / "sweep.yaml", "depths": "[1, 2]", "widths": "[16, 24]",
             "activations": 3200, "n_boot": 50, "sae_activations": 2048, "pca_k": 8,
             "fd_samples": 600, "fd_steps": 5, "fd_steps_list": "[1, 5]", "fd_boot": 10,
             "dlm_seqs": 4, "dlm_length": 16, "probe_tasks": 2, "probe_rows": 240,
             "probe_max_length": 32, "steer_prompts": 3, "steer_rs": "[0.4, 2.0]",
             "steer_direction_texts": 8, "utility_steer_prompts": 1, **over}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def repro(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repro")
    items = tiny_plan(tmp)
    assert main(["reproduce", *items]) == 0
    return tmp, items


def _json(path):
    return json.loads(path.read_text())


def test_report_has_six_findings_with_the_evaluations_numbers(repro):
    tmp, _ = repro
    report = (tmp / "report" / "REPORT.md").read_text()
    found = _json(tmp / "report" / "findings.json")["findings"]
    assert [f["key"] for f in found] == ["loss_law", "fd", "delta_lm", "probe", "steering",
                                         "utility"]
    for i, f in enumerate(found, 1):
        assert f"## {i}. {f['title']}" in report
        assert f["verdict"] in (F.REPRODUCED, F.NOT_REPRODUCED, F.INCONCLUSIVE)
        assert f"**Verdict: {f['verdict']}.**" in report
        for p in f["plots"]:
            assert (tmp / "report" / p).stat().st_size > 1000 and f"]({p})" in report
    scaling = _json(tmp / "repro" / "sweep" / "scaling.json")
    assert f"{scaling['loss_fit']['alpha']:.4g}" in found[0]["table"][4]
    t1 = _json(tmp / "repro" / "evals" / "table1.json")
    sae = next(r for r in t1["rows"] if r["method"].startswith("SAE"))
    assert any(f"{sae['fd']:.4g}" in line for line in found[1]["table"])
    t2 = _json(tmp / "repro" / "evals" / "table2.json")
    for m, d in t2["delta"].items():
        assert any(f"| {m} |" in line and f"{d:.4f}" in line for line in found[2]["table"])
    # the paired delta-LM interval is over the stored per-document losses
    best = min((m for m in t2["delta"] if m.startswith("GLP")), key=t2["delta"].get)
    diff = np.subtract(t2["doc_loss"][best], t2["doc_loss"][sae["method"]])
    assert f"{diff.mean():+.4f}" in found[2]["deciding"]
    assert np.mean(t2["doc_loss"][best]) - np.mean(t2["doc_loss"]["base"]) == \
        pytest.approx(t2["delta"][best], abs=1e-12)
    timings = _json(tmp / "repro" / "timings.json")
    assert {"extract", "sweep", "baselines", "utility", "fits", "table1 fd",
            "table2 delta-lm", "table4 probe", "steering (mean norm)",
            "steering (diffmean norm)"} <= set(timings)


def test_steering_points_recomputed_from_generations_equal_the_evaluation(repro):
    tmp, _ = repro
    for name in ("steer", "steer_diffmean"):
        st = _json(tmp / "repro" / "evals" / f"{name}.json")
        for m, rows in st["results"]["positive"].items():
            c01, f01 = F.steering_points(st, m)
            assert c01 == pytest.approx([r["concept01"] for r in rows], abs=1e-12)
            assert f01 == pytest.approx([r["fluency01"] for r in rows], abs=1e-12)
    mean, rel = (_json(tmp / "repro" / "evals" / f"{n}.json") for n in ("steer", "steer_diffmean"))
    assert mean["act_norm"]["norm"] == "mean" and rel["act_norm"]["norm"] == "diffmean"
    assert rel["act_norm"]["value"] == rel["direction"]["raw_norm"] < mean["act_norm"]["value"]


def test_utility_columns_cover_every_checkpoint_and_feed_the_fits(repro):
    tmp, _ = repro
    scaling = _json(tmp / "repro" / "sweep" / "scaling.json")
    assert set(scaling["downstream"]) == {"probe_auc_1d", "steer_score"}
    for metric in ("probe_auc_1d", "steer_score"):
        vl = scaling["downstream"][metric]["vs_loss"]
        if "skipped" not in vl:  # an independent least-squares line through the same points
            slope, intercept = np.polyfit(vl["x"], vl["y"], 1)
            assert vl["slope"] == pytest.approx(slope, rel=1e-6, abs=1e-9)


def test_rerun_skips_every_finished_part(repro):
    tmp, items = repro
    watched = [tmp / "repro" / "evals" / f"{n}.json" for n in
               ("table1", "table1_no_massive", "table2", "probe", "steer",
                "steer_diffmean")]
    watched += sorted((tmp / "repro" / "sweep").glob("*/metrics.jsonl"))
    watched += [tmp / "repro" / "sweep" / "scaling.json"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    timings = _json(tmp / "repro" / "timings.json")
    assert main(["reproduce", *items]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    again = _json(tmp / "repro" / "timings.json")
    assert set(again) == set(timings)  # no new part ran
    assert main(["reproduce", *items, "--report-only"]) == 0


def test_report_only_without_results_and_bad_plans_name_the_fix(tmp_path, capsys):
    assert main(["reproduce", *tiny_plan(tmp_path), "--report-only"]) == 2
    assert "glp reproduce" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'depths'"):
        load_plan(["deptsh=[1,2]"])
    with pytest.raises(ConfigError, match="at least two depths"):
        load_plan(["depths=[4]"])
    with pytest.raises(ConfigError, match="fd_reference"):
        load_plan(["fd_reference=all"])
    with pytest.raises(GLPError, match="no reproduction"):
        from glp_jax.reproduce.report import write_report

        write_report(tmp_path / "nothing", tmp_path / "r")


# ------------------------------------------------------------------- verdict arithmetic
def test_side_of_zero_and_combine():
    assert F.side_of_zero(-2, -1, want="negative") == F.REPRODUCED
    assert F.side_of_zero(1, 2, want="negative") == F.NOT_REPRODUCED
    assert F.side_of_zero(-1, 1, want="negative") == F.INCONCLUSIVE
    assert F.side_of_zero(0.1, 0.2, want="positive") == F.REPRODUCED
    assert F.side_of_zero(math.nan, 1, want="positive") == F.INCONCLUSIVE
    assert F.combine([F.REPRODUCED, F.REPRODUCED]) == F.REPRODUCED
    assert F.combine([F.REPRODUCED, F.INCONCLUSIVE]) == F.INCONCLUSIVE
    assert F.combine([F.INCONCLUSIVE, F.NOT_REPRODUCED]) == F.NOT_REPRODUCED


def test_pareto_area_equals_a_brute_force_grid_count():
    rng = np.random.default_rng(3)
    for _ in range(5):
        c, f = rng.random(6), rng.random(6)
        g = (np.arange(400) + 0.5) / 400
        cc, ff = np.meshgrid(g, g, indexing="ij")
        dominated = np.zeros_like(cc, bool)
        for ci, fi in zip(c, f, strict=True):
            dominated |= (cc <= ci) & (ff <= fi)
        assert F.pareto_area(c, f) == pytest.approx(dominated.mean(), abs=5e-3)
    assert F.pareto_area([1.0], [1.0]) == 1.0 and F.pareto_area([0.0], [1.0]) == 0.0


def test_fd_bootstrap_replicates_are_fds_of_resampled_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    y = rng.standard_normal((200, 5)) + 0.5
    boot = fd_bootstrap(x, y, 3, seed=7)
    ix = np.random.default_rng([7, 0]).integers(0, 300, 300)
    iy = np.random.default_rng([7, 1]).integers(0, 200, 200)
    xs, ys = x[ix], y[iy]
    s1, s2 = np.cov(xs, rowvar=False), np.cov(ys, rowvar=False)
    ref = (np.sum((xs.mean(0) - ys.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert boot[0] == pytest.approx(ref, rel=1e-8)
    # the reference resamples are shared across calls with the same seed: paired replicates
    other = fd_bootstrap(x + 0.1, y, 3, seed=7)
    assert not np.allclose(boot, other)
    assert F.boot_diff_ci(other, boot)[0] == pytest.approx(
        np.percentile(other - boot, 2.5))


def _scaling(switches, runs):
    return {"runs": [{"name": n, "params": p, "final_compute": c} for n, p, c in runs],
            "frontier": {"switches": switches}}


def test_genuine_switches_exclude_the_end_of_a_smaller_runs_range():
    runs = [("d1", 1e6, 1e13), ("d2", 2e6, 2e13)]
    handoff = {"compute": 1e13, "before": "d1", "after": "d2"}
    crossing = {"compute": 5e12, "before": "d1", "after": "d2"}
    assert F.genuine_switches(_scaling([handoff], runs)) == []
    assert F.genuine_switches(_scaling([crossing], runs)) == [crossing]
    back = {"compute": 5e12, "before": "d2", "after": "d1"}
    assert F.genuine_switches(_scaling([back], runs)) == []


def test_probe_finding_uses_paired_task_differences():
    per = {"t1": 0.9, "t2": 0.8, "t3": 0.85}
    lower = {k: v - 0.05 for k, v in per.items()}
    higher = {k: v + 0.05 for k, v in per.items()}

    def s(p):
        return {"mean": float(np.mean(list(p.values()))), "ci_low": 0.0, "ci_high": 1.0,
                "per_task": p}

    probe = {"methods": {"glp": {"kind": "glp"}, "raw": {"kind": "raw"}, "mlp": {"kind": "mlp"}},
             "auc_1d": {"glp": s(per), "raw": s(lower), "mlp": s(higher)},
             "tasks": [{}, {}, {}]}
    f = F.finding_probe(probe)
    assert "GLP > raw: reproduced" in f.deciding and "GLP > MLP: not reproduced" in f.deciding
    assert f.verdict == F.NOT_REPRODUCED
