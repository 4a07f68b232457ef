"""FD evaluation on a tiny real store pair and a tiny trained run: reference selection,
lower bound, the Identity control, device-count-independent sampling, reports and plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import linalg

import glp_jax
from glp_jax.config import make_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import ConfigError
from glp_jax.evals.fd import evaluate_fd, reference_rows, stores_of_run
from glp_jax.evals.recon import Identity, MeanAblation
from glp_jax.evals.sampling import batch_noise, sample_activations
from glp_jax.train import train

D = 8


def _store(path, n_docs, first_doc, rng, mix):
    lengths = rng.integers(1, 12, n_docs)
    docs = np.repeat(np.arange(first_doc, first_doc + n_docs), lengths)
    x = (rng.standard_normal((len(docs), D)) @ mix + 1.0).astype(np.float32)
    s = ActivationStore.create(path, StoreMeta(model="m", layers=[0], d=D, shard_rows=512))
    # two appends, the second interleaving a document of the first: still one document
    half = len(docs) // 2
    s.append({0: x[:half]}, np.zeros(half), docs[:half])
    s.append({0: x[half:]}, np.zeros(len(docs) - half),
             np.concatenate([[docs[0]], docs[half + 1:]]))
    return s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((D, D))
    _store(root / "train", 300, 0, rng, mix)
    _store(root / "val", 80, 100_000, rng, mix)
    cfg = make_config(dict(train_dataset=str(root / "train"), val_dataset=str(root / "val"),
                           n_layers=2, d_model=16, d_mlp=32, batch_size=64, num_steps=40,
                           learning_rate=3e-3, use_bf16=False, log_every_n_steps=20,
                           save_every_n_steps=40, eval_rows=64, epoch_size=640,
                           data_mode="repeat", output_path=str(root / "run"), progress=False))
    train(cfg)
    return root


def test_stores_of_run_and_missing_val(setup, tmp_path):
    tr, va = stores_of_run(setup / "run")
    assert tr.url.endswith("train") and va.url.endswith("val")
    run = json.loads((setup / "run" / "run.json").read_text())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text(json.dumps({**run, "val_dataset": None}))
    with pytest.raises(ConfigError, match="val_dataset"):
        stores_of_run(tmp_path / "r")


def test_one_token_per_document_is_seeded_and_distinct(setup):
    store = ActivationStore.open(str(setup / "val"))
    idx, info = reference_rows(store, 50, seed=3)
    docs = store.doc_ids(idx)
    assert len(idx) == 50 and len(set(docs.tolist())) == 50
    assert info["selection"] == "one token per document" and info["documents"] == 80
    again, _ = reference_rows(store, 50, seed=3)
    other, _ = reference_rows(store, 50, seed=4)
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, other)
    # fewer documents than asked: all of them, count reported
    idx_all, info_all = reference_rows(store, 10_000, seed=0)
    assert info_all["rows"] == 80 and len(set(store.doc_ids(idx_all).tolist())) == 80
    # every row of a document can be chosen (not only its first)
    firsts = {int(d): i for i, d in reversed(list(enumerate(store.doc_ids())))}
    picks = np.concatenate([reference_rows(store, 80, seed=s)[0] for s in range(5)])
    assert any(int(i) != firsts[int(store.doc_ids([i])[0])] for i in picks)


def test_random_rows_without_document_ids(tmp_path):
    s = ActivationStore.create(tmp_path / "s", StoreMeta(model="m", layers=[0], d=3))
    s.append({0: np.ones((100, 3), np.float32)}, np.zeros(100), np.full(100, -1))
    idx, info = reference_rows(s, 40, seed=0)
    assert len(set(idx.tolist())) == 40 and info["selection"].startswith("random rows")


def _lower_bound_by_hand(setup, n, seed):
    va, tr = ActivationStore.open(str(setup / "val")), ActivationStore.open(str(setup / "train"))
    vi, _ = reference_rows(va, n, seed, stream=0)
    ti, _ = reference_rows(tr, len(vi), seed, stream=1)
    x, y = tr.read_rows(ti).astype(np.float64), va.read_rows(vi).astype(np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_identity_reconstructor_gives_the_lower_bound(setup, tmp_path):
    tr, va = stores_of_run(setup / "run")
    res = evaluate_fd(Identity(), val_store=va, train_store=tr, n=60, seed=1,
                      out_dir=tmp_path, progress=False)
    assert res["fd"] == res["fd_lower_bound"]
    assert abs(res["fd_lower_bound"] - _lower_bound_by_hand(setup, 60, 1)) < 1e-8
    assert res["fd_by_steps"] is None and res["source"]["kind"] == "reconstructor"
    assert res["n_reference"] == 60 and res["reference"]["train"]["rows"] == 60
    assert (tmp_path / "fd.json").exists() and (tmp_path / "fd.md").exists()
    mean = evaluate_fd(MeanAblation(va.mean()), val_store=va, train_store=tr, n=60, seed=1,
                       progress=False)
    assert mean["fd"] > res["fd"]


def test_glp_fd_outputs(setup, tmp_path):
    glp = glp_jax.load(setup / "run")
    tr, va = stores_of_run(setup / "run")
    steps_list = (1, 2, 5)
    res = evaluate_fd(glp, val_store=va, train_store=tr, n=200, steps=5, steps_list=steps_list,
                      seed=0, batch_size=64, out_dir=tmp_path, progress=False)
    for key, typ in (("fd", float), ("fd_lower_bound", float), ("fd_by_steps", dict),
                     ("n_generated", int), ("n_reference", int), ("samples_per_s", float),
                     ("sqrtm", dict), ("source", dict), ("seed", int), ("reference", dict)):
        assert isinstance(res[key], typ), key
    assert sorted(res["fd_by_steps"]) == [1, 2, 5]
    assert res["fd"] == res["fd_by_steps"][5]
    assert all(np.isfinite(v) and v >= 0 for v in res["fd_by_steps"].values())
    assert res["n_generated"] == 200 and res["n_reference"] == 80  # all 80 val documents
    assert abs(res["fd_lower_bound"] - _lower_bound_by_hand(setup, 200, 0)) < 1e-8
    assert res["sqrtm"]["method"] == ["eigh"] and res["sqrtm"]["all_agree"] is True
    saved = json.loads((tmp_path / "fd.json").read_text())
    assert saved["fd"] == res["fd"] and set(saved["fd_by_steps"]) == {"1", "2", "5"}
    md = (tmp_path / "fd.md").read_text()
    assert "| steps | FD |" in md and "lower bound" in md
    import matplotlib.image

    png = tmp_path / "fd_pca.png"
    assert png.stat().st_size > 0 and res["plot"]["panels"] == len(steps_list)
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[1] > img.shape[0]  # three panels side by side


def test_sampling_is_seeded(setup):
    glp = glp_jax.load(setup / "run")
    a, stats = sample_activations(glp, 100, 4, seed=0, batch_size=64, progress=False)
    b, _ = sample_activations(glp, 100, 4, seed=0, batch_size=64, progress=False)
    c, _ = sample_activations(glp, 100, 4, seed=1, batch_size=64, progress=False)
    assert a.shape == (100, D) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    assert stats["batches"] == 2 and stats["padded_rows"] == 28 and stats["samples_per_s"] > 0


_FOUR = """
import sys, numpy as np, jax
jax.config.update("jax_num_cpu_devices", 4)
import glp_jax
from glp_jax.evals.sampling import batch_noise, sample_activations
assert len(jax.devices()) == 4
np.save(sys.argv[2] + ".noise.npy", batch_noise(0, 1, 64, 8))
x, st = sample_activations(glp_jax.load(sys.argv[1]), 100, 4, seed=0, batch_size=64,
                           progress=False)
assert st["devices"] == 4
np.save(sys.argv[2], x)
"""


def test_samples_identical_on_one_and_four_devices(setup, tmp_path):
    glp = glp_jax.load(setup / "run")
    one, st = sample_activations(glp, 100, 4, seed=0, batch_size=64, progress=False)
    assert st["devices"] == 1
    proc = subprocess.run([sys.executable, "-c", _FOUR, str(setup / "run"), str(tmp_path / "x.npy")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the noise is bit-identical; the samples differ only by matmul rounding of the
    # smaller per-device blocks
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy.noise.npy"), batch_noise(0, 1, 64, D))
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), one, rtol=1e-5, atol=1e-5)


def test_effective_batch_pads_little_and_ignores_device_count():
    from glp_jax.evals.sampling import effective_batch

    assert effective_batch(50_000, 4096, 1) == effective_batch(50_000, 4096, 8) == 3904
    assert 13 * 3904 - 50_000 < 13 * 64  # at most one 64-row granule per batch
    assert effective_batch(100, 64, 1) == 64 and effective_batch(4096, 4096, 4) == 4096
    assert effective_batch(50_000, 4096, 6) % 6 == 0


# ----------------------------------------------------------- bias-corrected FD, diagnostics
def test_glp_fd_has_bias_corrected_estimate_and_diagnostics(setup, tmp_path):
    glp = glp_jax.load(setup / "run")
    tr, va = stores_of_run(setup / "run")
    res = evaluate_fd(glp, val_store=va, train_store=tr, n=200, steps=5, steps_list=(5,),
                      seed=0, batch_size=64, out_dir=tmp_path, progress=False, plot=False)
    est = res["fd_estimate"]
    assert res["fd_inf"] == est["fd_inf"] and res["fd_inf_ci"] == [est["low"], est["high"]]
    assert est["low"] <= res["fd_inf"] <= est["high"]
    assert est["fd_raw"] == pytest.approx(res["fd"], rel=1e-9)  # the raw FD at all rows
    assert len(est["replicates"]) == 5 and est["rows_x"][0] == 200 and est["rows_y"][0] == 80
    low = res["fd_lower_bound_estimate"]
    assert low["fd_raw"] == pytest.approx(res["fd_lower_bound"], rel=1e-9)
    assert low["pairing"] == est["pairing"]  # scored against the same reference groups
    span = res["diagnostics"]["span"]
    assert span["rank"] == D and span["share_normalised"] == pytest.approx(1, abs=1e-6)
    assert span["share_raw"] == pytest.approx(1, abs=1e-6)
    per = res["diagnostics"]["per_dim"]
    assert len(per["worst"]) == 5 and per["median_var_ratio"] > 0
    md = (tmp_path / "fd.md").read_text()
    assert "## Bias-corrected FD" in md and f"{res['fd_inf']:.4g} [" in md
    assert "## Diagnostics" in md and "Reachable span" in md


def test_identity_estimate_equals_the_lower_bound_estimate(setup):
    tr, va = stores_of_run(setup / "run")
    res = evaluate_fd(Identity(), val_store=va, train_store=tr, n=60, seed=1, progress=False)
    assert res["fd_inf"] == res["fd_lower_bound_inf"]
    assert res["fd_inf_ci"] == res["fd_lower_bound_inf_ci"]
    assert "span" not in res["diagnostics"] and "per_dim" in res["diagnostics"]
    off = evaluate_fd(Identity(), val_store=va, train_store=tr, n=60, seed=1, progress=False,
                      replicates=0)
    assert "fd_inf" not in off and off["fd"] == res["fd"]
    with pytest.raises(ConfigError, match="replicates=0"):
        evaluate_fd(Identity(), val_store=va, train_store=tr, n=12, seed=1, progress=False,
                    replicates=6)


def _glp(d, width, seed=0):
    """A LoadedGLP of GLPConfig(d, width) whose only concrete weights are out_proj's (all
    the span needs; PyTorch's init, U(+-1/sqrt(fan_in))): no eager init, so ~0.1 s."""
    from flax import nnx

    from glp_jax.api import LoadedGLP
    from glp_jax.model import GLPConfig, Normalizer, abstract_glp

    cfg = GLPConfig(d_input=d, n_layers=1, d_model=width, d_mlp=8).resolved()
    rng = np.random.default_rng(seed)
    model = abstract_glp(cfg)
    bound = 1 / np.sqrt(width)
    model.out_proj.kernel = nnx.Param(rng.uniform(-bound, bound, (width, d)).astype(np.float32))
    norm = Normalizer.from_moments(rng.standard_normal(d), rng.uniform(0.5, 4.0, d))
    return LoadedGLP(model, norm, cfg, [], "random")


def test_reachable_span_share_full_rank_and_narrow():
    from flax import nnx

    from glp_jax.evals.fd import reachable_span

    d = 12
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) * 3 + 1)
    full = reachable_span(_glp(d, 2 * d), rows)
    assert full["rank"] == d
    assert abs(full["share_normalised"] - 1) < 1e-6 and abs(full["share_raw"] - 1) < 1e-6

    narrow = _glp(d, 5)
    mean = np.asarray(narrow.normalizer.mean, np.float64)
    std = np.asarray(narrow.normalizer.std, np.float64)
    z = (rows - mean) / std
    # a random narrow velocity: the closed-form share of an orthogonal projection
    w = np.asarray(narrow.model.out_proj.kernel[...], np.float64)  # [5, d]
    got = reachable_span(narrow, rows)
    q = linalg.orth(w.T)  # [d, 5], orthonormal basis of the velocity's span
    cz = np.cov(z, rowvar=False)
    assert got["rank"] == 5
    assert got["share_normalised"] == pytest.approx(np.trace(q.T @ cz @ q) / np.trace(cz),
                                                    abs=1e-6)
    qr = linalg.orth(std[:, None] * w.T)  # the same span in raw space: diag(std) W^T
    cr = np.cov(rows, rowvar=False)
    assert got["share_raw"] == pytest.approx(np.trace(qr.T @ cr @ qr) / np.trace(cr), abs=1e-6)
    assert got["share_normalised"] < 0.9
    # velocity along the first 5 axes: the share is those axes' share of the variance
    narrow.model.out_proj.kernel = nnx.Param(np.eye(5, d, dtype=np.float32) * 0.7)
    axes = reachable_span(narrow, rows)
    assert axes["share_normalised"] == pytest.approx(z.var(0)[:5].sum() / z.var(0).sum(),
                                                     abs=1e-6)
    assert axes["share_raw"] == pytest.approx(rows.var(0)[:5].sum() / rows.var(0).sum(),
                                              abs=1e-6)


def test_per_dim_variance_names_the_massive_dimensions():
    from glp_jax.evals.fd import per_dim_variance

    rng = np.random.default_rng(1)
    real = rng.standard_normal((3000, 20)) + 0.5
    real[:, 3] = (real[:, 3] - 0.5) * 40 + 0.5  # sd 40 against a median RMS of 1.12
    real[:, 11] += 30  # |mean| 30.5
    real[:, 5] += 8  # |mean| 8.5 and sd 1: 7.6x, not massive
    gen = real[rng.permutation(3000)[:2000]].copy()
    gen[:, 7] *= 3  # variance 9x
    gen[:, 3] *= 0.5  # the massive dimension under-dispersed 4x
    res = per_dim_variance(gen, real)
    ratio = gen.var(0, ddof=1) / real.var(0, ddof=1)
    assert res["median_var_ratio"] == pytest.approx(np.median(ratio))
    assert [w["dim"] for w in res["worst"][:2]] == [7, 3]
    assert {m["dim"]: m["why"] for m in res["massive"]} == {3: ["variance"], 11: ["mean"]}
    m3 = next(m for m in res["massive"] if m["dim"] == 3)
    assert m3["var_ratio"] == pytest.approx(ratio[3]) and m3["var_real"] == pytest.approx(
        real[:, 3].var(ddof=1))
    assert res["share_within_2x"] == pytest.approx(18 / 20)
