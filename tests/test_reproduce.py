"""`glp reproduce` end to end on a tiny plan (real SmolLM2, real fortune text, a two-depth
sweep), the report built from it, and the verdict arithmetic against independent
computations (numpy, scipy, brute force)."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from glp_jax.cli import main
from glp_jax.errors import ConfigError, GLPError
from glp_jax.evals.frechet import fd_estimates
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
             "fd_samples": 600, "fd_steps": 5, "fd_steps_list": "[1, 5]", "fd_replicates": 3,
             "dlm_seqs": 4, "dlm_length": 16, "probe_tasks": 2, "probe_rows": 240,
             "probe_max_length": 32, "steer_prompts": 3, "steer_rs": "[0.4, 2.0]",
             "steer_direction_texts": 8, "utility_steer_prompts": 1,
             "steer_calibration_rs": "[1.0, 4.0, 16.0]", "steer_calibration_prompts": 3,
             **over}  # 3 of the 12 searched r, 3 prompts (default 2 x steer_prompts)
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


def _fd_row(method, est, depth=None):
    row = {"method": method, "fd": est.fd_raw, "fd_inf": est.fd_inf, "fd_inf_ci": list(est.ci),
           "fd_estimate": est.to_dict()}
    return row if depth is None else {**row, "depth": depth}


def test_fd_finding_pairs_replicates_of_the_bias_corrected_fd():
    rng = np.random.default_rng(0)
    d = 6
    y = rng.standard_normal((600, d))
    xs = {"d1": rng.standard_normal((600, d)) * 1.3 + 0.4, "d2": rng.standard_normal((600, d)),
          "sae": rng.standard_normal((600, d)) * 1.6}
    est = fd_estimates(xs, y, seed=3)
    lower = fd_estimates({"x": rng.standard_normal((600, d))}, y, seed=3)["x"]
    table = {"rows": [_fd_row("SAE k=4", est["sae"]), _fd_row("GLP d1", est["d1"], 1),
                      _fd_row("GLP d2", est["d2"], 2)], "n": 600,
             "fd_lower_bound": lower.fd_raw, "fd_lower_bound_inf": lower.fd_inf,
             "fd_lower_bound_inf_ci": list(lower.ci)}
    parts, deciding = F.fd_parts(table)
    # by hand: the t-interval of the replicate differences, centred on the FD_inf difference
    diff = np.subtract(est["d2"].replicates, est["d1"].replicates)
    half = scipy.stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    centre = est["d2"].fd_inf - est["d1"].fd_inf
    assert f"{centre:+.4g}, 95% CI {F.ci_text(centre - half, centre + half)}" in deciding[0]
    assert parts["FD falls with size"] == F.side_of_zero(centre - half, centre + half,
                                                         want="negative") == F.REPRODUCED
    assert parts["the best GLP beats the SAE"] == F.REPRODUCED
    f = F.finding_fd(table)
    assert f.verdict == F.REPRODUCED
    row = next(line for line in f.table if line.startswith("| GLP d2 |"))
    assert f"{est['d2'].fd_inf:.4g} [" in row and f"| {est['d2'].fd_raw:.4g} |" in row
    # another reference set breaks the pairing: the claim cannot be decided
    other = fd_estimates({"x": xs["d2"]}, y[:500], seed=3)["x"]
    table["rows"][2] = _fd_row("GLP d2", other, 2)
    parts, deciding = F.fd_parts(table)
    assert parts["FD falls with size"] == F.INCONCLUSIVE and "not paired" in deciding[0]
    # a table written before FD_inf existed is stale, not silently judged on raw FDs
    old = {"rows": [{"method": "GLP d1", "fd": 1.0, "depth": 1},
                    {"method": "GLP d2", "fd": 0.5, "depth": 2}]}
    assert F.fd_parts(old)[0] == {"FD falls with size": F.INCONCLUSIVE}


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
    rng = np.random.default_rng(0)
    per = {f"t{i}": v for i, v in enumerate(rng.uniform(0.7, 0.9, 8))}
    lower = {k: v - 0.05 - 0.01 * i for i, (k, v) in enumerate(per.items())}
    higher = {k: v + 0.05 + 0.01 * i for i, (k, v) in enumerate(per.items())}

    def s(p):
        return {"mean": float(np.mean(list(p.values()))), "ci_low": 0.0, "ci_high": 1.0,
                "per_task": p}

    probe = {"methods": {"glp": {"kind": "glp"}, "raw": {"kind": "raw"}, "mlp": {"kind": "mlp"},
                         "sae": {"kind": "sae"}},
             "auc_1d": {"glp": s(per), "raw": s(lower), "mlp": s(higher),
                        "sae": s({k: v + (0.02 if i % 2 else -0.02) for i, (k, v)
                                  in enumerate(per.items())})},
             "tasks": [{}] * 8}
    f = F.finding_probe(probe)
    assert "GLP > raw: reproduced" in f.deciding and "GLP > MLP: not reproduced" in f.deciding
    assert "GLP > SAE: inconclusive" in f.deciding  # differences of both signs
    assert f.verdict == F.NOT_REPRODUCED
    d = np.subtract(list(per.values()), list(lower.values()))
    t = scipy.stats.ttest_rel(list(per.values()), list(lower.values()))
    assert f"GLP - raw = {d.mean():+.3f}" in f.deciding and f"paired t p = {t.pvalue:.2g}" \
        in f.deciding
    # 8 tasks, all differences positive: the exact sign-flip test's floor, 2 / 2^8
    assert f"sign-flip p = {2 / 256:.2g}" in f.deciding
    # three tasks: the sign-flip test cannot reach p < 0.05, so nothing is decided
    few = {**probe, "auc_1d": {k: s(dict(list(v["per_task"].items())[:3]))
                               for k, v in probe["auc_1d"].items()}, "tasks": [{}] * 3}
    assert F.finding_probe(few).verdict == F.INCONCLUSIVE
