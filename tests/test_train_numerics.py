"""One training step against numpy float64 (loss, gradient norm, AdamW update); a tiny model
overfits; errors for bad configs and mismatched stores."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_model import np_forward, params_f64

from glp_jax import flow
from glp_jax.config import make_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import ConfigError, StoreError
from glp_jax.model import GLP, GLPConfig
from glp_jax.train import TrainingDivergedError, lr_factor, make_optimizer, make_train_step, train


def _np_loss(P, x, eps, sigma):
    z = (1 - sigma[:, None]) * x + sigma[:, None] * eps
    v, _ = np_forward(P, z, sigma)
    return np.mean((v - (eps - x)) ** 2)


def test_one_step_matches_numpy_float64():
    gcfg = GLPConfig(d_input=4, n_layers=2)
    model = GLP(gcfg, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    cfg = make_config(dict(train_dataset="x", batch_size=8, num_steps=100, use_bf16=False,
                           learning_rate=1e-3, gradient_clipping_threshold=0.05))
    tx, schedule = make_optimizer(cfg, 100)
    opt_state = tx.init(params)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    base_key = jax.random.key(7)
    step_fn = jax.jit(make_train_step(graphdef, tx, accum=1, compute_dtype=jnp.float32,
                                      discrete=True))
    new_params, _, loss, gnorm = step_fn(params, opt_state, jnp.asarray(x), None, jnp.int32(0),
                                         base_key)
    # The same sigma and noise the step draws (inputs, not results).
    k_sigma, k_eps = jax.random.split(jax.random.fold_in(base_key, 0))
    sigma = np.asarray(flow.sample_train_sigma(k_sigma, 8, discrete=True), np.float64)
    eps = np.asarray(jax.random.normal(k_eps, (8, 4)), np.float64)
    P = params_f64(model)
    x64 = x.astype(np.float64)
    ref_loss = _np_loss(P, x64, eps, sigma)
    # Central differences in float64: error ~h^2 ~ 1e-12, far below the fp32 tolerance.
    grads, h = {}, 1e-6
    for k, v in P.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            hi, lo = dict(P), dict(P)
            hi[k], lo[k] = v.copy(), v.copy()
            hi[k][i] += h
            lo[k][i] -= h
            g[i] = (_np_loss(hi, x64, eps, sigma) - _np_loss(lo, x64, eps, sigma)) / (2 * h)
        grads[k] = g
    ref_gnorm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-6)
    np.testing.assert_allclose(float(gnorm), ref_gnorm, rtol=1e-4)
    # AdamW's first update on clipped gradients: m_hat = g, v_hat = g^2.
    lr = 1e-3 * float(lr_factor(0, 100))
    clip = min(1.0, 0.05 / ref_gnorm)
    nmodel = nnx.merge(graphdef, new_params)
    Pn = params_f64(nmodel)
    for k, v in P.items():
        g = grads[k] * clip
        want = v - lr * (g / (np.abs(g) + 1e-8) + 0.01 * v)
        np.testing.assert_allclose(Pn[k], want, rtol=0, atol=lr * 2e-3 + 1e-7)
    assert float(schedule(0)) == pytest.approx(1e-5)


def test_lr_schedule_matches_the_original_formula():
    T, W = 1000, 10
    for s in (0, 5, 10, 500, 999, 1000, 1200):
        if s < W:
            want = 0.01 + 0.99 * s / W
        elif s >= T:
            want = 0.1
        else:
            want = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - W) / (T - W)))
        assert float(lr_factor(s, T)) == pytest.approx(want, rel=1e-6)


def _store(path, n=4096, d=8, seed=0, model="m", layers=(0,), clusters=4):
    s = ActivationStore.create(path, StoreMeta(model=model, layers=list(layers), d=d, shard_rows=1024))
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 3
    x = centers[rng.integers(0, clusters, n)] + 0.05 * rng.standard_normal((n, d))
    s.append({k: x.astype(np.float32) for k in layers}, np.zeros(n), np.zeros(n))
    return s


def test_tiny_model_overfits_tiny_dataset(tmp_path):
    _store(tmp_path / "s", clusters=2)
    cfg = make_config(dict(train_dataset=str(tmp_path / "s"), n_layers=2, d_model=64, d_mlp=128,
                           batch_size=256, num_steps=300, learning_rate=3e-3, data_mode="repeat",
                           log_every_n_steps=10, save_every_n_steps=1000, use_bf16=False,
                           output_path=str(tmp_path / "run"), progress=False))
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    # 2 tight clusters: the learned velocity field nearly removes the data term of the loss.
    assert first > 1.0 and last < first / 3, (first, last)
    assert rows[-1]["step"] == 300 and rows[-1]["activations_seen"] == 300 * 256


def test_divergence_stops_with_a_clear_message(tmp_path):
    _store(tmp_path / "s")
    cfg = make_config(dict(train_dataset=str(tmp_path / "s"), n_layers=1, batch_size=64,
                           num_steps=40, learning_rate=1e30, gradient_clipping_threshold=0,
                           warmup_ratio=0.0, data_mode="repeat", log_every_n_steps=5,
                           save_every_n_steps=5, output_path=str(tmp_path / "run"), progress=False))
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        train(cfg)


def test_bad_configs_and_mismatched_stores(tmp_path):
    _store(tmp_path / "s")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        make_config({"learning_rat": 1})
    with pytest.raises(ConfigError, match="divisible"):
        make_config({"batch_size": 10, "gradient_accumulation_steps": 3})
    base = dict(train_dataset=str(tmp_path / "s"), num_steps=2, batch_size=64,
                output_path=str(tmp_path / "r"), progress=False)
    with pytest.raises(ConfigError, match="d_input=16 but the store holds d=8"):
        train(make_config({**base, "d_input": 16}))
    with pytest.raises(StoreError, match="not an activation store|does not exist"):
        train(make_config({**base, "train_dataset": str(tmp_path / "nowhere")}))
    _store(tmp_path / "v", d=8, model="other")
    with pytest.raises(ConfigError, match="does not match train_dataset"):
        train(make_config({**base, "val_dataset": str(tmp_path / "v")}))
    with pytest.raises(ConfigError, match="set num_steps or num_activations"):
        train(make_config({**base, "num_steps": None}))


def test_gradient_accumulation_averages_strided_micro_batches():
    """accum=4: the update equals AdamW applied to the mean of the four micro-batch
    gradients, micro-batch a = rows a, a+4, a+8, ... with key split(key, 4)[a]."""
    from glp_jax.train import loss_fn

    gcfg = GLPConfig(d_input=4, n_layers=1)
    graphdef, params = nnx.split(GLP(gcfg, rngs=nnx.Rngs(0)))
    cfg = make_config(dict(train_dataset="x", batch_size=16, gradient_accumulation_steps=4,
                           num_steps=10, use_bf16=False, learning_rate=1e-2))
    tx, _ = make_optimizer(cfg, 10)
    opt = tx.init(params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4)), jnp.float32)
    base = jax.random.key(3)
    step = jax.jit(make_train_step(graphdef, tx, accum=4, compute_dtype=jnp.float32,
                                   discrete=True))
    new_params, _, loss, gnorm = step(params, opt, x, None, jnp.int32(2), base)
    keys = jax.random.split(jax.random.fold_in(base, 2), 4)
    micro_grad = jax.jit(lambda p, xa, k: jax.value_and_grad(loss_fn)(  # one compile, not
        p, graphdef, xa, None, k, compute_dtype=jnp.float32, discrete=True))  # eager x4
    grads, losses = [], []
    for a in range(4):
        l_a, g_a = micro_grad(params, x[a::4], keys[a])
        grads.append(g_a)
        losses.append(float(l_a))
    mean_g = jax.tree.map(lambda *g: sum(g) / 4, *grads)
    updates, _ = tx.update(mean_g, opt, params)
    want = optax.apply_updates(params, updates)
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-6)
    assert float(gnorm) == pytest.approx(float(optax.global_norm(mean_g)), rel=1e-5)
    for got, ref in zip(jax.tree.leaves(new_params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-7)


def test_follow_mode_trains_while_rows_are_appended(tmp_path):
    """data_mode=follow: training starts on an empty store and consumes rows as a writer
    commits them (here a thread standing in for a live extraction)."""
    import threading
    import time

    store = ActivationStore.create(tmp_path / "s", StoreMeta(model="m", layers=[0], d=8,
                                                            shard_rows=1024))
    rng = np.random.default_rng(0)
    commits = []

    def writer():
        for _ in range(8):
            time.sleep(0.4)
            x = rng.standard_normal((512, 8)).astype(np.float32)
            store.append({0: x}, np.zeros(512), np.zeros(512))
            commits.append(time.monotonic())

    th = threading.Thread(target=writer)
    th.start()
    cfg = make_config(dict(train_dataset=str(tmp_path / "s"), n_layers=1, batch_size=64,
                           num_steps=40, data_mode="follow", follow_timeout_s=60,
                           log_every_n_steps=10, save_every_n_steps=100,
                           output_path=str(tmp_path / "run"), progress=False))
    row = train(cfg)
    commits_before_end = len(commits)
    th.join()
    assert row["step"] == 40
    # 40 steps x 64 rows need 3 follow blocks of 16 x 64 rows, i.e. 6 commits of 512: the
    # trainer must have waited for them.
    assert commits_before_end >= 6


def test_rerun_with_other_settings_or_grown_store_is_refused(tmp_path):
    store = _store(tmp_path / "s", n=1024)
    base = dict(train_dataset=str(tmp_path / "s"), n_layers=1, batch_size=64, num_steps=4,
                data_mode="repeat", save_every_n_steps=2, output_path=str(tmp_path / "run"),
                progress=False)
    train(make_config(base))
    with pytest.raises(ConfigError, match="n_layers"):
        train(make_config({**base, "n_layers": 2}))
    store.append({0: np.ones((64, 8), np.float32)}, np.zeros(64), np.zeros(64))
    with pytest.raises(ConfigError, match="the run started on 1024 rows, the store now holds 1088"):
        train(make_config(base))


def test_corrupt_only_checkpoint_is_moved_aside_and_training_restarts(tmp_path, capfd):
    _store(tmp_path / "s", n=1024)
    base = dict(train_dataset=str(tmp_path / "s"), n_layers=1, batch_size=64, num_steps=8,
                data_mode="repeat", save_every_n_steps=4, stop_at_step=4,
                output_path=str(tmp_path / "run"), progress=False)
    train(make_config(base))
    state_dir = tmp_path / "run" / "checkpoints" / "4" / "state"
    victims = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in victims:
        p.write_bytes(b"\0" * 7)
    capfd.readouterr()
    train(make_config({**base, "stop_at_step": None}))
    err = [ln for ln in capfd.readouterr().err.splitlines() if "glp: warning" in ln]
    assert len(err) == 1 and "checkpoint step 4 of" in err[0] and re.search("truncated to 7 of|has 7 bytes", err[0])
    assert "no intact step is left: training from scratch" in err[0]
    moved = tmp_path / "run" / "checkpoints_corrupt" / "4" / "state"
    assert sorted(p.stat().st_size for p in moved.rglob("*") if p.is_file()
                  and p.stat().st_size) == [7] * len(victims)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [4, 8]


@pytest.mark.parametrize("remat,unroll", [(True, 1), (False, 0), (False, 2), (True, 0)])
def test_remat_and_unrolled_blocks_give_the_same_loss_and_gradients(remat, unroll):
    """Recomputed or unrolled blocks are the same function: loss and gradients equal the
    plain scan's to float32 rounding."""
    from glp_jax.train import loss_fn, scan_unroll

    graphdef, params = nnx.split(GLP(GLPConfig(d_input=4, n_layers=3), rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
    out = [jax.jit(jax.value_and_grad(
        lambda p, r=r, u=u: loss_fn(p, graphdef, x, None, jax.random.key(1),
                                    compute_dtype=jnp.float32, discrete=True, remat=r,
                                    unroll=u)))(params) for r, u in ((False, 1), (remat, unroll))]
    np.testing.assert_allclose(float(out[0][0]), float(out[1][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    auto = make_config(dict(train_dataset="x", num_steps=1))
    assert (scan_unroll(auto, 3), scan_unroll(auto, 24)) == (0, 1)
    assert scan_unroll(make_config(dict(train_dataset="x", num_steps=1, scan_unroll=2)), 3) == 2
