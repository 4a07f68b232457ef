"""Scaling fits: known laws recovered from synthetic sweeps, frontier geometry, loading, reports.

The synthetic sweeps are built like the paper's: four GLP sizes (the Llama1B d3..d24 parameter
counts), one run each with log-spaced checkpoints from 1M to 1024M activations, so C spans
~2.7e15..2.0e19. Each run follows the true law L = E + A·C^-alpha inside its compute-efficient
window and lies above it outside (small models late, large models early), times 1% lognormal
noise.
"""

import json

import numpy as np
import pytest
from matplotlib import image as mpimg

from glp_jax import plots, scaling
from glp_jax.errors import GLPError

TRUE_E, TRUE_A, TRUE_ALPHA = 0.52, 435.1, 0.169  # the paper's loss law
PARAMS_BY_DEPTH = {3: 453_117_952, 6: 855_881_728, 12: 1_661_409_280, 24: 3_272_464_384}
CHECKPOINTS = 1e6 * 2.0 ** (np.arange(21) / 2)  # activations seen, 1M .. 1024M
BATCH = 4096


def true_law(compute):
    return TRUE_E + TRUE_A * np.asarray(compute) ** -TRUE_ALPHA


def synthetic_sweep(seed, noise=0.01, late_exponent=0.5, early_exponent=1.5):
    """{depth: (activations, compute, loss, excess)}; excess = noise-free loss / law - 1.

    Each size owns one slice of the compute axis, as on a real frontier. Outside it the run
    uses its data less well: past the slice a small model learns as if it had seen only
    D_eff = D_hi·(D/D_hi)^0.5 activations (it flattens out); before it a large model has
    D_eff = D_lo·(D/D_lo)^1.5 (big models start slowly). Curves stay smooth and decreasing.
    """
    rng = np.random.default_rng(seed)
    params = np.array(list(PARAMS_BY_DEPTH.values()), dtype=np.float64)
    c_lo, c_hi = 6 * params[0] * CHECKPOINTS[0], 6 * params[-1] * CHECKPOINTS[-1]
    edges = np.exp(np.linspace(np.log(c_lo), np.log(c_hi), len(params) + 1))
    sweep = {}
    for i, (depth, n) in enumerate(PARAMS_BY_DEPTH.items()):
        compute = 6 * n * CHECKPOINTS
        d_lo, d_hi = edges[i] / (6 * n), edges[i + 1] / (6 * n)
        d_eff = np.where(CHECKPOINTS > d_hi, d_hi * (CHECKPOINTS / d_hi) ** late_exponent,
                         CHECKPOINTS)
        d_eff = np.where(CHECKPOINTS < d_lo, d_lo * (CHECKPOINTS / d_lo) ** early_exponent, d_eff)
        clean = true_law(6 * n * d_eff)
        loss = clean * np.exp(noise * rng.standard_normal(len(compute)))
        sweep[depth] = (CHECKPOINTS, compute, loss, clean / true_law(compute) - 1)
    return sweep


def synthetic_curves(seed, **kw):
    return [scaling.Curve(f"d{depth}", compute, loss)
            for depth, (_, compute, loss, _) in synthetic_sweep(seed, **kw).items()]


def write_sweep(root, seed=0, noise=0.01):
    """A sweep on disk the way the trainer writes it, with downstream evals on their own lines.

    probe_auc = 0.995 - 0.240·L and steer_score = 1.346 - 0.928·L (the paper's lines) plus
    noise; the d6 run logs compute_6nd, the others leave it to be derived from params.
    """
    rng = np.random.default_rng(seed + 1000)
    for depth, (seen, compute, loss, _) in synthetic_sweep(seed, noise=noise).items():
        run_dir = root / f"d{depth}"
        run_dir.mkdir(parents=True)
        config = {"model": {"n_layers": depth, "d_model": 4096},
                  "train": {"seed": seed, "num_activations": 1_024_000_000},
                  "params": PARAMS_BY_DEPTH[depth]}
        (run_dir / "config.json").write_text(json.dumps(config))
        lines = []
        for k, (d, c, val_loss) in enumerate(zip(seen, compute, loss, strict=True)):
            row = {"step": int(d // BATCH), "activations_seen": float(d),
                   "loss": float(val_loss * 1.01), "val_loss": float(val_loss)}
            if depth == 6:
                row["compute_6nd"] = float(c)
            lines.append(row)
            if k % 2 == 0:
                lines.append({"step": int(d // BATCH),
                              "probe_auc": 0.995 - 0.240 * val_loss + 0.002 * rng.standard_normal(),
                              "steer_score": 1.346 - 0.928 * val_loss
                              + 0.005 * rng.standard_normal()})
        text = "\n".join(json.dumps(r) for r in lines) + "\n"
        if depth == 3:  # a killed writer's partial last line
            text += '{"step": 999999, "loss": 0.'
        (run_dir / "metrics.jsonl").write_text(text)
    return root


# ----------------------------------------------------------------------------- loss law


def _frontier_fit(seed, n_boot):
    env = scaling.frontier(synthetic_curves(seed))
    compute = [p.compute for p in env.points]
    loss = [p.loss for p in env.points]
    return env, scaling.fit_power_law(compute, loss, n_boot=n_boot, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_the_law_from_a_noisy_sweep(seed):
    env, fit = _frontier_fit(seed, n_boot=200)
    for name, true in (("E", TRUE_E), ("A", TRUE_A), ("alpha", TRUE_ALPHA)):
        lo, hi = fit.intervals[name]
        assert lo <= true <= hi, (name, true, fit.intervals[name])
    # Tolerances: just above the worst case over 200 simulated seeds (A trades off against
    # alpha, so it gets a factor; the fitted curve itself is within 2.5% of the true law).
    assert fit.E == pytest.approx(TRUE_E, rel=0.17)
    assert fit.alpha == pytest.approx(TRUE_ALPHA, rel=0.16)
    assert abs(np.log(fit.A / TRUE_A)) < np.log(2.5)
    grid = np.logspace(np.log10(fit.compute.min()), np.log10(fit.compute.max()), 100)
    assert np.abs(fit.predict(grid) / true_law(grid) - 1).max() < 0.025
    assert len(fit.compute) == len(env.points)


def test_frontier_drops_above_frontier_points():
    env = scaling.frontier(synthetic_curves(0))
    sweep = synthetic_sweep(0)
    on = {(p.name, p.row) for p in env.points}
    for depth, (_, _, _, excess) in sweep.items():
        far_above = np.flatnonzero(excess > 0.05)  # 5% above the law, 5 noise sigmas
        assert far_above.size and not any((f"d{depth}", int(j)) in on for j in far_above)
    assert {p.name for p in env.points} == {"d3", "d6", "d12", "d24"}


def test_fitting_all_points_instead_of_the_frontier_is_biased():
    curves = synthetic_curves(0, noise=0.0)
    compute = np.concatenate([c.compute for c in curves])
    loss = np.concatenate([c.value for c in curves])
    biased = scaling.fit_power_law(compute, loss, n_boot=0)
    _, fit = _frontier_fit(0, n_boot=0)
    truth = np.array([TRUE_E, TRUE_ALPHA])
    assert np.abs(np.array([biased.E, biased.alpha]) / truth - 1).max() > 0.05
    assert np.abs(np.array([fit.E, fit.alpha]) / truth - 1).max() < 0.02


def test_noise_free_fit_is_exact():
    env = scaling.frontier(synthetic_curves(0, noise=0.0))
    fit = scaling.fit_power_law([p.compute for p in env.points], [p.loss for p in env.points],
                                n_boot=0)
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((TRUE_E, TRUE_A, TRUE_ALPHA), rel=1e-6)
    assert fit.formula() == "L = 0.52 + 435.1·C^-0.169"
    assert fit.intervals == {}


def test_bootstrap_fit_returns_ordered_intervals_and_is_seeded():
    env = scaling.frontier(synthetic_curves(3))
    compute, loss = [p.compute for p in env.points], [p.loss for p in env.points]
    intervals = scaling.bootstrap_fit(compute, loss, n_boot=100, seed=7)
    assert set(intervals) == {"E", "A", "alpha"}
    assert all(lo < hi for lo, hi in intervals.values())
    assert intervals == scaling.bootstrap_fit(compute, loss, n_boot=100, seed=7)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(GLPError, match="too few points"):
        scaling.fit_power_law([1e15, 1e16, 1e17], [2.0, 1.5, 1.2])
    with pytest.raises(GLPError, match="must be > 0"):
        scaling.fit_power_law([1e15, 1e16, 1e17, 1e18], [2.0, 1.5, -1.2, 1.0])


# ----------------------------------------------------------------------------- frontier


def _crossing_curves():
    """a = 2·C^-0.1 on [1e1, 1e6] and b = 4·C^-0.2 on [1e2, 1e8]: they cross at C = 2^10."""
    c_a = np.logspace(1, 6, 16)
    c_b = np.logspace(2, 8, 19)
    return [scaling.Curve("a", c_a, 2 * c_a ** -0.1), scaling.Curve("b", c_b, 4 * c_b ** -0.2)]


def test_frontier_of_two_crossing_curves():
    env = scaling.frontier(_crossing_curves(), n_grid=101)
    assert len(env.switches) == 1
    switch = env.switches[0]
    assert (switch.before, switch.after) == (0, 1)
    assert switch.compute == pytest.approx(1024.0, rel=1e-9)

    grid = env.compute_grid
    want = np.where(grid <= 1e2, 2 * grid ** -0.1, np.minimum(2 * grid ** -0.1, 4 * grid ** -0.2))
    want = np.where(grid > 1e6, 4 * grid ** -0.2, want)
    np.testing.assert_allclose(env.loss_grid, want, rtol=1e-12)
    np.testing.assert_array_equal(env.curve_grid, np.where(grid < 1024, 0, 1))
    assert list(env.curve_at([50.0, 1000.0, 1100.0, 1e7])) == [0, 0, 1, 1]

    for p in env.points:
        assert (p.name == "a" and p.compute <= 1024) or (p.name == "b" and p.compute >= 1024)
    a_on = [p.compute for p in env.points if p.name == "a"]
    b_on = [p.compute for p in env.points if p.name == "b"]
    np.testing.assert_allclose(a_on, np.logspace(1, 6, 16)[np.logspace(1, 6, 16) <= 1024])
    np.testing.assert_allclose(b_on, np.logspace(2, 8, 19)[np.logspace(2, 8, 19) >= 1024])


def test_frontier_ignores_a_curve_that_is_always_above():
    c = np.logspace(2, 5, 10)
    curves = [*_crossing_curves(), scaling.Curve("worse", c, 3 * c ** -0.1)]
    env = scaling.frontier(curves)
    assert "worse" not in {p.name for p in env.points}
    assert 2 not in set(env.curve_grid)


def test_frontier_final_points_only():
    # Final points (C, L): r1 (10, 1.0), r2 (100, 1.2) dominated, r3 (1000, 0.8), r4 (1000, 0.9).
    curves = [scaling.Curve("r1", [1, 10], [3.0, 1.0]),
              scaling.Curve("r2", [5, 100], [2.0, 1.2]),
              scaling.Curve("r3", [20, 1000], [2.5, 0.8]),
              scaling.Curve("r4", [30, 1000], [2.4, 0.9])]
    env = scaling.frontier(curves, final_only=True, n_grid=7)
    assert [(p.name, p.compute, p.loss, p.row) for p in env.points] == [
        ("r1", 10.0, 1.0, 1), ("r3", 1000.0, 0.8, 1)]
    assert [(s.compute, s.before, s.after) for s in env.switches] == [(1000.0, 0, 2)]
    np.testing.assert_allclose(env.loss_grid, [1.0] * 6 + [0.8])
    assert list(env.curve_at([10, 999, 1000, 5000])) == [0, 0, 2, 2]


def test_frontier_keeps_curve_indices_when_a_curve_is_empty():
    a, b = _crossing_curves()
    # Final points: a at (1e6, 0.5), b at (1e8, 0.16).
    for final_only, probe in ((False, [50.0, 1e7]), (True, [2e6, 1e8])):
        env = scaling.frontier([a, scaling.Curve("empty", [], []), b], final_only=final_only)
        assert {(p.curve, p.name) for p in env.points} == {(0, "a"), (2, "b")}
        assert list(env.curve_at(probe)) == [0, 2]


def test_frontier_needs_points():
    with pytest.raises(GLPError, match="no points"):
        scaling.frontier([scaling.Curve("empty", [], [])])


# ----------------------------------------------------------------------------- downstream


def test_downstream_vs_compute_recovers_a_saturating_law():
    rng = np.random.default_rng(0)
    compute = np.logspace(15, 19.3, 30)
    steer = 0.63 - 3.92e6 * compute ** -0.420 + 0.005 * rng.standard_normal(30)
    fit = scaling.fit_downstream_vs_compute(compute, steer, n_boot=300, seed=0)
    assert fit.increasing
    for name, true in (("a", 0.63), ("b", 3.92e6), ("beta", 0.420)):
        lo, hi = fit.intervals[name]
        assert lo <= true <= hi, (name, fit.intervals[name])
    assert fit.a == pytest.approx(0.63, abs=0.01)
    assert fit.beta == pytest.approx(0.420, rel=0.03)
    assert fit.b == pytest.approx(3.92e6, rel=0.3)
    assert fit.formula(y="steer").startswith("steer = 0.63")


def test_downstream_vs_compute_detects_a_falling_metric():
    compute = np.logspace(15, 19.3, 25)
    fd = 0.2 + 300 * compute ** -0.15  # FD falls with compute: f = a + b·C^-beta
    fit = scaling.fit_downstream_vs_compute(compute, fd, n_boot=0)
    assert not fit.increasing
    assert (fit.a, fit.b, fit.beta) == pytest.approx((0.2, 300, 0.15), rel=1e-5)
    assert " + " in fit.formula()


def test_linear_vs_loss_recovers_the_line():
    rng = np.random.default_rng(1)
    loss = np.linspace(0.7, 1.6, 40)
    steer = 1.346 - 0.928 * loss + 0.01 * rng.standard_normal(40)
    fit = scaling.fit_linear_vs_loss(loss, steer, n_boot=500, seed=0)
    assert fit.intercept == pytest.approx(1.346, abs=0.03)
    assert fit.slope == pytest.approx(-0.928, abs=0.03)
    assert fit.intervals["intercept"][0] <= 1.346 <= fit.intervals["intercept"][1]
    assert fit.intervals["slope"][0] <= -0.928 <= fit.intervals["slope"][1]
    assert fit.formula() == f"f = {scaling.format_number(fit.intercept)} - " \
                            f"{scaling.format_number(-fit.slope)}·L"



def _fits_of_each_kind():
    compute = np.logspace(15, 19.3, 25)
    loss = np.linspace(0.7, 1.6, 25)
    return [
        scaling.fit_power_law(compute, true_law(compute), n_boot=20, seed=0),
        scaling.fit_downstream_vs_compute(compute, 0.63 - 3.92e6 * compute ** -0.42, n_boot=20),
        scaling.fit_downstream_vs_compute(compute, 0.2 + 300 * compute ** -0.15, n_boot=0),
        scaling.fit_linear_vs_loss(loss, 1.346 - 0.928 * loss, n_boot=20),
    ]


@pytest.mark.parametrize("through_json", [False, True])
def test_from_dict_predicts_exactly_what_the_fit_predicts(through_json):
    for fit in _fits_of_each_kind():
        d = fit.to_dict()
        if through_json:
            d = json.loads(json.dumps(d))
        back = type(fit).from_dict(d)
        grid = np.logspace(14, 20, 50) if not isinstance(fit, scaling.LinearFit) \
            else np.linspace(0.5, 2.0, 50)
        np.testing.assert_array_equal(back.predict(grid), fit.predict(grid))
        assert back.coefficients == fit.coefficients
        assert back.formula() == fit.formula()
        assert back.intervals == fit.intervals
        assert back.to_dict() == fit.to_dict()


# ----------------------------------------------------------------------------- sweeps on disk


def test_load_runs_reads_configs_and_derives_compute(tmp_path):
    runs = scaling.load_runs(write_sweep(tmp_path / "sweep"))
    assert [r.name for r in runs] == ["d3", "d6", "d12", "d24"]
    d3 = runs[0]
    assert (d3.n_layers, d3.d_model, d3.seed, d3.params) == (3, 4096, 0, PARAMS_BY_DEPTH[3])
    assert len(d3.rows) == len(CHECKPOINTS)  # eval lines merged by step, partial line skipped
    np.testing.assert_allclose(d3.compute(), 6 * PARAMS_BY_DEPTH[3] * CHECKPOINTS)
    assert np.isfinite(d3.column("probe_auc")).sum() == 11
    assert scaling.default_loss_column(runs) == "val_loss"
    assert scaling.metric_columns(runs) == ["probe_auc", "steer_score"]


def test_load_runs_later_line_for_a_step_wins(tmp_path):
    run_dir = tmp_path / "sweep" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"params": 1000, "n_layers": 3}))
    rows = [{"step": 1, "activations_seen": 10, "loss": 2.0},
            {"step": 2, "activations_seen": 20, "loss": 1.5},
            {"step": 2, "activations_seen": 20, "loss": 1.4},  # re-logged after a resume
            {"step": 3, "activations_seen": 30, "loss": 1.3}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    [run] = scaling.load_runs(tmp_path / "sweep")
    np.testing.assert_allclose(run.column("loss"), [2.0, 1.4, 1.3])
    assert scaling.default_loss_column([run]) == "loss"


def test_load_runs_errors_name_the_problem(tmp_path):
    with pytest.raises(GLPError, match="does not exist"):
        scaling.load_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GLPError, match="no runs found"):
        scaling.load_runs(tmp_path / "empty")
    bad = tmp_path / "bad" / "r"
    bad.mkdir(parents=True)
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(GLPError, match=r"metrics.jsonl:2 is not valid JSON"):
        scaling.load_runs(tmp_path / "bad")


def test_fit_sweep_end_to_end(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sweep", seed=0)
    result = scaling.fit_sweep(sweep_dir, n_boot=100, seed=0)
    json.dumps(result, allow_nan=False)  # JSON-able, no NaN
    assert result["loss_column"] == "val_loss" and not result["final_only"]
    fit = result["loss_fit"]
    assert fit["alpha"] == pytest.approx(TRUE_ALPHA, rel=0.15)
    assert fit["intervals"]["E"][0] <= TRUE_E <= fit["intervals"]["E"][1]
    assert fit["n_points"] == len(result["frontier"]["points"]) == len(fit["x"])
    # Noise may flip the envelope back and forth near a hand-over, but only between neighbours.
    switches = [(s["before"], s["after"]) for s in result["frontier"]["switches"]]
    order = ["d3", "d6", "d12", "d24"]
    assert switches[0][0] == "d3" and switches[-1][1] == "d24"
    assert all(abs(order.index(a) - order.index(b)) == 1 for a, b in switches)

    # probe_auc = 0.995 - 0.240·L, so on the frontier it follows 0.870 - 104.4·C^-0.169.
    probe = result["downstream"]["probe_auc"]
    assert probe["vs_loss"]["slope"] == pytest.approx(-0.240, abs=0.02)
    assert probe["vs_loss"]["intercept"] == pytest.approx(0.995, abs=0.02)
    assert probe["vs_compute"]["increasing"]
    assert probe["vs_compute"]["beta"] == pytest.approx(TRUE_ALPHA, rel=0.5)
    steer = result["downstream"]["steer_score"]["vs_loss"]
    assert steer["slope"] == pytest.approx(-0.928, abs=0.05)

    md = scaling.results_markdown(result)
    for depth, params in PARAMS_BY_DEPTH.items():
        assert f"| d{depth} | {depth} | {scaling.format_count(params)} |" in md
    assert fit["formula"] in md and "| alpha |" in md and "probe_auc" in md


def test_fit_sweep_final_only_uses_last_points(tmp_path):
    # One run per budget, all on the law (no noise): the frontier is every final point.
    root = tmp_path / "budgets"
    budgets = [(n, d) for n in (1e8, 4e8, 1.6e9) for d in (2e7, 2e8)]
    for i, (n, d) in enumerate(budgets):
        run_dir = root / f"run{i}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps({"params": n, "n_layers": i}))
        seen = np.geomspace(d / 100, d, 5)
        rows = [{"step": k, "activations_seen": s, "loss": float(true_law(6 * n * s) * 1.05)}
                for k, s in enumerate(seen[:-1])]
        rows.append({"step": 4, "activations_seen": d, "loss": float(true_law(6 * n * d))})
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = scaling.fit_sweep(root, final_only=True, n_boot=0, metrics=[])
    assert result["final_only"] and len(result["frontier"]["points"]) == len(budgets)
    fit = result["loss_fit"]
    assert (fit["E"], fit["A"], fit["alpha"]) == pytest.approx((TRUE_E, TRUE_A, TRUE_ALPHA),
                                                               rel=1e-5)


def test_plots_write_nonblank_pngs(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sweep", seed=0)
    runs = scaling.load_runs(sweep_dir)
    result = scaling.fit_runs(runs, n_boot=20)
    paths = plots.plot_sweep(runs, result, tmp_path / "plots")
    assert {p.name for p in paths} == {
        "loss_vs_compute.png", "loss_vs_activations.png", "probe_auc_vs_compute.png",
        "probe_auc_vs_loss.png", "steer_score_vs_compute.png", "steer_score_vs_loss.png"}
    for path in paths:
        assert path.stat().st_size > 10_000
        assert mpimg.imread(path)[..., :3].std() > 0.05  # not a blank canvas


def test_write_results_writes_both_files_and_reads_back(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sweep", seed=0)
    result = scaling.fit_sweep(sweep_dir, n_boot=0, metrics=[])
    json_path, md_path = scaling.write_results(sweep_dir, result)
    assert (json_path, md_path) == (sweep_dir / "scaling.json", sweep_dir / "scaling.md")
    assert json.loads(json_path.read_text()) == result == scaling.read_results(sweep_dir)
    assert md_path.read_text() == scaling.results_markdown(result)
    assert not list(sweep_dir.glob("*.tmp")) and not list(sweep_dir.glob(".*.tmp"))
    with pytest.raises(GLPError, match="no scaling.json"):
        scaling.read_results(tmp_path)


def test_format_number_handles_non_finite_interval_ends():
    """A bootstrap interval can end at inf or nan; the report must still be written."""
    from glp_jax.scaling.formatting import format_number

    assert [format_number(v) for v in (float("inf"), float("nan"), 3.92e6, 0.169)] == \
        ["inf", "nan", "3.92e6", "0.169"]
