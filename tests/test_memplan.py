"""Memory plans: the real step compiled over 1, 2 and 8 simulated devices; per-device
parameter, optimizer and batch bytes equal the analytic counts; `fit` finds the largest
micro-batch under a target. Each plan runs in a subprocess (the device count is fixed when
JAX starts)."""

import json
import os
import subprocess
import sys

import pytest

# batch 1024: activations, which data parallelism splits, outweigh the whole-gradient buffers
TINY = ["d_input=64", "d_model=128", "d_mlp=256", "n_layers=2", "batch_size=1024",
        "train_dataset=unused", "num_steps=10"]
MESHES = [(1, 1), (2, 1), (1, 2), (8, 1), (1, 8), (2, 4)]


def _glp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glp_jax", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def plans():
    mesh_args = [a for d, f in MESHES for a in ("--mesh", f"data={d},fsdp={f}")]
    out = _glp("config", "check", *TINY, *mesh_args, "--json")
    assert out.returncode == 0, out.stderr
    return {tuple(p["mesh"]): p for p in json.loads(out.stdout)["plans"]}


def test_per_device_bytes_match_the_analytic_count(plans):
    from glp_jax.model import GLPConfig, param_count

    n = param_count(GLPConfig(d_input=64, d_model=128, d_mlp=256, n_layers=2).resolved())
    for (data, fsdp), p in plans.items():
        assert p["params"] == n
        assert p["param_bytes"] == n * 4 // fsdp  # fp32, every leaf split over fsdp
        assert 0 <= p["opt_bytes"] - 2 * p["param_bytes"] < 64  # AdamW mu, nu (+ step counts)
        assert p["batch_bytes"] == 1024 * 64 * 4 // (data * fsdp)
        assert p["micro_batch_per_device"] == 1024 // (data * fsdp)
        assert p["total_bytes"] >= p["param_bytes"] + p["opt_bytes"] + p["temp_bytes"]


def test_sharding_scales_as_expected(plans):
    # data parallelism keeps whole parameters but splits the batch: fewer temporaries
    assert plans[(8, 1)]["param_bytes"] == plans[(2, 1)]["param_bytes"] == plans[(1, 1)]["param_bytes"]
    assert plans[(8, 1)]["temp_bytes"] < plans[(1, 1)]["temp_bytes"]
    # fsdp splits parameters and optimizer state
    assert plans[(1, 8)]["param_bytes"] * 8 == plans[(1, 1)]["param_bytes"]
    assert plans[(2, 4)]["param_bytes"] * 4 == plans[(1, 1)]["param_bytes"]
    assert plans[(1, 8)]["total_bytes"] < plans[(1, 1)]["total_bytes"]


def test_fit_finds_the_largest_micro_batch_under_a_target():
    small = [*TINY, "batch_size=4"]  # 6 settings to compile (accumulation 1-4, remat)
    out = _glp("config", "check", *small, "--mesh", "data=1,fsdp=1", "--fit", "1", "--json")
    assert out.returncode == 0, out.stderr
    every = json.loads(out.stdout)["plans"]  # nothing fits 1 byte: every setting, in order
    assert [(p["accum"], p["remat"]) for p in every] == [
        (a, r) for r in (False, True) for a in (1, 2, 4)]
    totals = [p["total_bytes"] for p in every]
    limit = (totals[0] + min(totals)) / 2  # the full micro-batch does not fit, something does
    expected = next(i for i, t in enumerate(totals) if t <= limit)
    out = _glp("config", "check", *small, "--mesh", "data=1,fsdp=1", "--fit",
               str(int(limit / 0.9) + 1), "--json")
    tried = json.loads(out.stdout)["plans"]
    assert len(tried) == expected + 1 and tried[-1]["total_bytes"] == totals[expected]
    assert all(p["total_bytes"] > limit for p in tried[:-1])
