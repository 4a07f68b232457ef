"""Loss-law and downstream intervals that mean what they say.

The inner fixed-E fit against numpy/scipy least squares; coverage of E's and alpha's
(joint) intervals on synthetic frontiers whose points are correlated within a run; E left
unidentified where the data cannot see it; the bootstrap resampling whole runs with cold
refits; downstream fits reported unidentified instead of as numbers; the findings' words.

A synthetic frontier: `n_runs` runs, each owning one slice of the compute axis (as on a
real frontier), `per_run` log-spaced points in it; log L = log(E + A·C^-alpha) + a run
offset (sd `run_sigma`) + AR(1) noise within the run (sd `point_sigma`, lag-1 corr `rho`).
"""

import json

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import least_squares

from glp_jax import scaling
from glp_jax.reproduce import findings as F
from glp_jax.scaling import fits

TRUTH = (0.52, 435.1, 0.169)  # the paper's loss law


def synthetic_frontier(rng, E=TRUTH[0], A=TRUTH[1], alpha=TRUTH[2], *, n_runs=6, per_run=5,
                       c_lo=2.7e15, c_hi=2e19, run_sigma=0.004, point_sigma=0.003, rho=0.6):
    """(compute, loss, run id) of a frontier with noise correlated within each run."""
    edges = np.geomspace(c_lo, c_hi, n_runs + 1)
    compute, loss, runs = [], [], []
    for k in range(n_runs):
        c = np.geomspace(edges[k], edges[k + 1], per_run + 1)[1:]
        ar = np.empty(per_run)
        ar[0] = rng.standard_normal()
        for j in range(1, per_run):
            ar[j] = rho * ar[j - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal()
        noise = run_sigma * rng.standard_normal() + point_sigma * ar
        compute.append(c)
        loss.append((E + A * c ** -alpha) * np.exp(noise))
        runs += [f"run{k}"] * per_run
    return np.concatenate(compute), np.concatenate(loss), np.array(runs)


def _log_residuals(compute, loss, e):
    log_c = np.log(compute)
    return lambda t: np.log(loss) - np.log(e + np.exp(t[0] - t[1] * log_c))


# ------------------------------------------------------------------- the fixed-E inner fit


def test_fixed_e_fit_at_zero_is_numpy_least_squares():
    compute, loss, _ = synthetic_frontier(np.random.default_rng(0))
    log_a, alpha, objective = fits.fit_loss_law_fixed_e(compute, loss, [0.0])
    design = np.column_stack([np.ones_like(compute), -np.log(compute)])
    (ref_log_a, ref_alpha), rss, *_ = np.linalg.lstsq(design, np.log(loss), rcond=None)
    assert log_a[0] == pytest.approx(ref_log_a, rel=1e-12)
    assert alpha[0] == pytest.approx(ref_alpha, rel=1e-11)
    assert objective[0] == pytest.approx(0.5 * rss[0], rel=1e-9)


@pytest.mark.parametrize("huber_delta", [None, 2e-3])
def test_fixed_e_fit_equals_scipy_least_squares(huber_delta):
    compute, loss, _ = synthetic_frontier(np.random.default_rng(1))
    e_values = loss.min() * np.array([0.1, 0.5, 0.7, 0.95])
    log_a, alpha, objective = fits.fit_loss_law_fixed_e(compute, loss, e_values,
                                                        huber_delta=huber_delta)
    for i, e in enumerate(e_values):
        kw = {} if huber_delta is None else {"loss": "huber", "f_scale": huber_delta}
        ref = least_squares(_log_residuals(compute, loss, e), [np.log(loss.mean()), 0.1],
                            xtol=1e-15, ftol=1e-15, gtol=1e-15, **kw)
        assert (log_a[i], alpha[i]) == pytest.approx(tuple(ref.x), rel=1e-7, abs=1e-9)
        # scipy's cost is the sum of rho with rho(r) = r^2 / 2 inside delta: ours exactly.
        assert objective[i] == pytest.approx(ref.cost, rel=1e-8)


def test_profile_minimum_is_the_three_parameter_least_squares_optimum():
    compute, loss, _ = synthetic_frontier(np.random.default_rng(2))
    profile = fits.profile_loss_law(compute, loss)
    log_c = np.log(compute)
    ref = least_squares(lambda t: np.log(loss) - np.log(t[2] + np.exp(t[0] - t[1] * log_c)),
                        [np.log(TRUTH[1]), TRUTH[2], TRUTH[0]], xtol=1e-15, ftol=1e-15,
                        gtol=1e-15)
    assert (profile.E, np.log(profile.A), profile.alpha) == pytest.approx(tuple(ref.x[[2, 0, 1]]),
                                                                         rel=1e-6)
    assert profile.objective == pytest.approx(ref.cost, rel=1e-9)
    assert profile.objective <= np.nanmin(profile.objective_grid)


def test_profile_interval_ends_where_the_statistic_crosses_the_cutoff():
    compute, loss, runs = synthetic_frontier(np.random.default_rng(3))
    n = len(loss)
    for groups, dof in ((None, n - 3), (runs, 6 - 1)):
        p = fits.profile_loss_law(compute, loss, groups=groups)
        assert p.dof == dof and p.cutoff == pytest.approx(stats.f.ppf(0.95, 1, dof))
        assert p.variance_ratio >= 1.0
        lo, hi = p.intervals["E"]
        assert 0 < lo < p.E < hi < loss.min()
        objective = fits.fit_loss_law_fixed_e(compute, loss, [lo, hi])[2]
        np.testing.assert_allclose(2 * p.lr_scale * (objective - p.objective), p.cutoff,
                                   rtol=1e-6)
        # Joint: the best alpha at each end of E's interval lies inside alpha's interval.
        alpha_at_ends = fits.fit_loss_law_fixed_e(compute, loss, [lo, hi])[1]
        a_lo, a_hi = p.intervals["alpha"]
        assert a_lo <= alpha_at_ends.min() and alpha_at_ends.max() <= a_hi
    # Points correlated within runs carry less information than as many independent ones.
    independent = fits.profile_loss_law(compute, loss)
    by_run = fits.profile_loss_law(compute, loss, groups=runs)
    assert np.ptp(by_run.intervals["E"]) > np.ptp(independent.intervals["E"])


# ----------------------------------------------------------------------------- coverage


def _coverage(trials, n_boot, n_grid, seed=0, truth=TRUTH, **frontier_kw):
    """Fraction of trials whose 95% E and alpha intervals cover the truth; and of trials
    with E identified."""
    rng = np.random.default_rng(seed)
    e_true, _, alpha_true = truth
    hits = np.zeros(3)
    for i in range(trials):
        compute, loss, runs = synthetic_frontier(rng, *truth, **frontier_kw)
        fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=n_boot, seed=i,
                                    n_grid=n_grid)
        (e_lo, e_hi), (a_lo, a_hi) = fit.intervals["E"], fit.intervals["alpha"]
        hits += [e_lo <= e_true <= e_hi, a_lo <= alpha_true <= a_hi, fit.e_identified]
    return hits / trials


def test_intervals_cover_the_truth_on_correlated_frontiers():
    """50 frontiers of 6 runs x 5 points, ~0.5% noise shared within a run: the profile plus
    a modest run-level bootstrap covers E and alpha in >= 90% of them (measured over seeds
    0-5 at this size: E 0.96-0.98, alpha 0.96-1.0)."""
    e_rate, alpha_rate, identified = _coverage(trials=50, n_boot=40, n_grid=64)
    assert e_rate >= 0.9 and alpha_rate >= 0.9, (e_rate, alpha_rate)
    assert identified >= 0.9  # E = 0.52 over 3.9 decades is visible at this noise


@pytest.mark.slow
@pytest.mark.parametrize("frontier_kw", [
    {},
    {"n_runs": 5, "per_run": 8, "run_sigma": 0.005},
    {"n_runs": 8, "per_run": 5, "run_sigma": 0.002, "point_sigma": 0.004, "rho": 0.8},
    {"run_sigma": 0.0, "point_sigma": 0.006, "rho": 0.0},
])
def test_intervals_cover_the_truth_thoroughly(frontier_kw):
    e_rate, alpha_rate, _ = _coverage(trials=200, n_boot=100, n_grid=128, seed=11,
                                      **frontier_kw)
    assert e_rate >= 0.9 and alpha_rate >= 0.9, (e_rate, alpha_rate)


@pytest.mark.parametrize("case", ["short compute range", "floor small against the noise"])
def test_unidentifiable_e_gives_an_interval_to_the_grid_end(case):
    rng = np.random.default_rng(4)
    if case == "short compute range":  # one decade: curvature the noise hides
        compute, loss, runs = synthetic_frontier(rng, c_lo=1e17, c_hi=1e18, run_sigma=0.005)
    else:
        compute, loss, runs = synthetic_frontier(rng, E=0.01, A=20.0, alpha=0.05)
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=50, seed=0)
    lo, hi = fit.intervals["E"]
    assert not fit.e_identified and fit.e_reason.startswith("E unidentified")
    grid = fit.profile.e_grid
    assert fit.e_reaches_zero or fit.e_reaches_min_loss
    assert (lo < grid[1]) == fit.e_reaches_zero and (hi > grid[-2]) == fit.e_reaches_min_loss
    assert hi - lo > 0.3 * loss.min()  # wide, not a point
    assert fit.intervals["alpha"][1] / fit.intervals["alpha"][0] > 1.2  # alpha pays for it


# ----------------------------------------------------------------------------- bootstrap


def test_group_resamples_draw_whole_runs():
    groups = np.array(["a"] * 3 + ["b"] * 5 + ["c"] * 1 + ["d"] * 4 + ["e"] * 2)
    sizes = {g: int((groups == g).sum()) for g in np.unique(groups)}
    resamples = list(fits.group_resamples(groups, 200, seed=5))
    assert len(resamples) == 200
    assert len({len(idx) for idx in resamples}) > 3  # sizes vary: runs, not points, drawn
    for idx in resamples:
        counts = np.bincount(idx, minlength=len(groups))
        times_drawn = {}
        for g in sizes:
            member_counts = counts[groups == g]
            assert len(set(member_counts)) == 1  # all of a run's points, or none
            times_drawn[g] = int(member_counts[0])
        assert sum(times_drawn.values()) == len(sizes)  # as many runs as the data
        assert len(idx) == sum(times_drawn[g] * sizes[g] for g in sizes)
    again = list(fits.group_resamples(groups, 200, seed=5))
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again, strict=True))


def test_every_refit_sees_whole_runs_and_no_starting_point(monkeypatch):
    compute, loss, runs = synthetic_frontier(np.random.default_rng(6))
    seen = []
    real = fits._loss_law_minima

    def spy(*args, **kwargs):  # the refits get the points and their counts, nothing else
        assert len(args) + len(kwargs) == 5
        seen.append(args[2].copy())
        return real(*args, **kwargs)

    monkeypatch.setattr(fits, "_loss_law_minima", spy)
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=30, seed=0)
    assert fit.bootstrap.unit == "run" and fit.bootstrap.n_groups == 6
    counts = np.concatenate(seen)
    assert counts.shape == (30, len(loss))
    np.testing.assert_array_equal(counts, fits.resample_counts(runs, 30, seed=0))
    for row in counts:
        per_run = [set(row[runs == r]) for r in np.unique(runs)]
        assert all(len(c) == 1 for c in per_run)  # a run's points all in, the same times
        assert sum(c.pop() for c in per_run) == 6

    # Each refit is what the same grid search gives on that resample alone.
    idx = np.repeat(np.arange(len(loss)), counts[0].astype(int))
    alone = scaling.fit_power_law(compute[idx], loss[idx], n_boot=0)
    refit = fits._loss_law_minima(compute, loss, counts[:1], None, fits.E_GRID_POINTS)[0]
    assert refit == pytest.approx([alone.E, alone.A, alone.alpha], rel=2e-3)


def test_refits_are_cold_so_intervals_do_not_end_at_the_estimate():
    """The review's case: a floor the data cannot see. Warm-started refits of the old fit
    stayed at its E = 3e-10 (interval [2.9e-10, 3.1e-10]); cold grid refits find the
    E > 0 the resamples allow."""
    rng = np.random.default_rng(7)
    compute, loss, runs = synthetic_frontier(rng, E=0.0, A=20.0, alpha=0.05, run_sigma=0.002,
                                             point_sigma=0.002)
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=100, seed=0)
    boot_lo, boot_hi = fit.bootstrap.intervals["E"]
    assert fit.E < 0.05 * loss.min()
    assert boot_hi > fit.E + 0.1 * loss.min()  # the upper end is nowhere near the estimate
    assert not fit.e_identified and fit.e_reaches_zero and fit.intervals["E"][0] == 0.0
    # An identified floor: the bootstrap interval straddles the estimate with room each side.
    compute, loss, runs = synthetic_frontier(rng)
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=100, seed=0)
    boot_lo, boot_hi = fit.bootstrap.intervals["E"]
    assert boot_lo < 0.97 * fit.E and boot_hi > 1.03 * fit.E


# ----------------------------------------------------------------------------- downstream


def _runs_of(n_runs, per_run):
    return np.repeat([f"run{k}" for k in range(n_runs)], per_run)


def test_a_straight_line_in_log_c_is_an_unidentified_saturating_fit():
    rng = np.random.default_rng(8)
    compute = np.logspace(15, 19, 25)
    value = 0.3 + 0.02 * np.log10(compute) + 0.003 * rng.standard_normal(25)  # no saturation
    fit = scaling.fit_downstream_vs_compute(compute, value, groups=_runs_of(5, 5), n_boot=60)
    assert not fit.identified and fit.intervals == {}
    assert fit.reason.startswith("fit unidentified") and "beta" in fit.reason
    d = json.loads(json.dumps(fit.to_dict()))
    assert d["identified"] is False and d["intervals"] == {} and d["bootstrap"]["unit"] == "run"
    md = scaling.results_markdown(_minimal_result(downstream={"steer_score": {
        "vs_compute": d, "vs_loss": {"skipped": "n/a", "n_points": 0}}}))
    assert "fit unidentified" in md


def test_a_saturating_law_with_runs_is_identified_with_run_level_intervals():
    rng = np.random.default_rng(9)
    compute = np.logspace(15, 19.3, 25)
    value = 0.63 - 3.92e6 * compute ** -0.42 + 0.004 * rng.standard_normal(25)
    fit = scaling.fit_downstream_vs_compute(compute, value, groups=_runs_of(5, 5), n_boot=100)
    assert fit.identified and fit.reason == ""
    assert fit.bootstrap.unit == "run" and fit.bootstrap.n_groups == 5
    lo, hi = fit.intervals["beta"]
    assert lo <= 0.42 <= hi and lo < fit.beta < hi


def test_linear_fit_bootstraps_runs_and_needs_three_of_them():
    rng = np.random.default_rng(10)
    loss = np.linspace(0.7, 1.6, 20)
    value = 1.346 - 0.928 * loss + 0.01 * rng.standard_normal(20)
    fit = scaling.fit_linear_vs_loss(loss, value, groups=_runs_of(4, 5), n_boot=100)
    assert fit.identified and fit.bootstrap.unit == "run"
    assert fit.intervals["slope"][0] <= -0.928 <= fit.intervals["slope"][1]
    two = scaling.fit_linear_vs_loss(loss, value, groups=_runs_of(2, 10), n_boot=100)
    assert not two.identified and two.intervals == {} and "2 run(s)" in two.reason
    assert two.slope == pytest.approx(fit.slope)  # the line itself is the same fit


# ----------------------------------------------------------------------------- reports


def _minimal_result(loss_fit=None, downstream=None):
    if loss_fit is None:
        compute, loss, runs = synthetic_frontier(np.random.default_rng(12))
        loss_fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=20).to_dict()
    return {"loss_column": "val_loss", "method": "m", "note": "n", "n_points_logged": 30,
            "runs": [{"name": "r", "n_layers": 3, "params": 1e6, "final_compute": 1e18,
                      "final_loss": 1.0}],
            "frontier": {"points": [], "switches": []}, "loss_fit": loss_fit,
            "downstream": downstream or {}}


def test_findings_and_report_state_an_unidentified_e_plainly():
    rng = np.random.default_rng(13)
    compute, loss, runs = synthetic_frontier(rng, c_lo=1e17, c_hi=1e18, run_sigma=0.005)
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=50)
    result = _minimal_result(json.loads(json.dumps(fit.to_dict())))
    finding = F.finding_loss_law(result)
    assert "E > 0: inconclusive" in finding.deciding and "E unidentified" in finding.deciding
    assert "(unidentified)" in finding.table[3] and "joint with E" in finding.table[4]
    assert any(n.startswith("E unidentified") and "With E fixed at 0" in n
               for n in finding.notes)
    md = scaling.results_markdown(result)
    assert "**E unidentified:**" in md and "bootstrap over 6 runs" in md


def test_utility_finding_reports_unidentified_fits_not_intervals():
    rng = np.random.default_rng(14)
    loss = np.linspace(0.7, 1.6, 20)
    steer = 1.346 - 0.928 * loss + 0.01 * rng.standard_normal(20)
    two_runs = scaling.fit_linear_vs_loss(loss, steer, groups=_runs_of(2, 10), n_boot=50)
    compute = np.logspace(15, 19, 20)
    line = scaling.fit_downstream_vs_compute(
        compute, 0.3 + 0.02 * np.log10(compute) + 0.003 * rng.standard_normal(20),
        groups=_runs_of(4, 5), n_boot=50)
    result = {"downstream": {"steer_score": {"vs_loss": two_runs.to_dict(),
                                             "vs_compute": line.to_dict()}}}
    finding = F.finding_utility(result)
    assert finding.verdict == F.INCONCLUSIVE
    assert "steer_score improves as loss falls: inconclusive" in finding.deciding
    row = finding.table[2]
    assert row.count("fit unidentified") == 2 and "b [" not in row


def test_new_fields_survive_json():
    compute, loss, runs = synthetic_frontier(np.random.default_rng(15))
    fit = scaling.fit_power_law(compute, loss, groups=runs, n_boot=20)
    d = json.loads(json.dumps(fit.to_dict(), allow_nan=False))
    back = scaling.PowerLawFit.from_dict(d)
    assert back.to_dict() == d
    assert d["groups"] == runs.tolist() and d["bootstrap"]["unit"] == "run"
    assert d["e_identified"] is True and d["profile"]["dof"] == 5
    assert back.profile.intervals == fit.profile.intervals


def test_fit_runs_tells_every_fit_the_run_of_each_point(tmp_path):
    from test_scaling import write_sweep

    result = scaling.fit_sweep(write_sweep(tmp_path / "sweep"), n_boot=30, seed=0)
    fit = result["loss_fit"]
    assert fit["groups"] == [p["run"] for p in result["frontier"]["points"]]
    assert fit["bootstrap"]["unit"] == "run" and fit["bootstrap"]["n_groups"] == 4
    for metric in ("probe_auc", "steer_score"):
        for kind in ("vs_compute", "vs_loss"):
            d = result["downstream"][metric][kind]
            assert d["bootstrap"]["unit"] == "run" and len(d["groups"]) == d["n_points"]
            assert set(d["groups"]) <= {"d3", "d6", "d12", "d24"}


def test_findings_read_a_scaling_json_from_before_the_profile():
    """The committed report's numbers (reports/REPORT.md): the old fit had no profile and
    no e_identified; its E interval pinned near zero still reads as unresolved."""
    compute = np.geomspace(3.76e10, 9.41e13, 12)
    legacy = {"formula": "L = 3.07e-10 + 4.918·C^-0.03879", "E": 3.07e-10, "A": 4.918,
              "alpha": 0.03879, "x": compute.tolist(),
              "y": (4.918 * compute ** -0.03879).tolist(),
              "intervals": {"E": [2.893e-10, 3.071e-10], "A": [4.8, 5.0],
                            "alpha": [0.03686, 0.04016]}}
    finding = F.finding_loss_law(_minimal_result(legacy))
    assert "E > 0: inconclusive" in finding.deciding
    assert any(n.startswith("E unidentified") and "1% of the lowest fitted loss" in n
               for n in finding.notes)
