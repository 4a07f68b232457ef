"""The TopK SAE baseline: sizes, forward and loss against numpy float64, unit-norm decoder,
training through the GLP's loop (metrics, resume, sharding), and glp_jax.load of an SAE run
against a manual numpy reconstruction."""

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import glp_jax
from glp_jax import sae
from glp_jax.config import TrainConfig, make_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import ConfigError
from glp_jax.sae import LoadedSAE, SAEConfig, TopKSAE
from glp_jax.sharding import param_spec
from glp_jax.train import SAESpec, make_optimizer, make_step, train

D, WIDTH, K = 16, 128, 4


# ---------------------------------------------------------------------------- references
def np_forward(p, x, k):
    """float64: top-k of ReLU((x - b_dec) W_enc + b_enc) by argsort, dense decode."""
    pre = np.maximum((x - p["b_dec"]) @ p["w_enc"] + p["b_enc"], 0.0)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, idx, np.take_along_axis(pre, idx, 1), 1)
    return z @ p["w_dec"] + p["b_dec"], z, pre


def f64(p):
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def random_params(cfg, seed=0):
    """Init, then every parameter perturbed (non-zero biases, encoder != decoder^T)."""
    p = TopKSAE(cfg, rngs=nnx.Rngs(seed)).arrays()
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(np.asarray(v) + 0.1 * rng.standard_normal(v.shape), jnp.float32)
            for k, v in p.items()}


# ---------------------------------------------------------------------------- sizes, math
@pytest.mark.parametrize("d,width", [(16, None), (16, 100), (576, 9216), (2048, 32768)])
def test_param_count_formula_matches_eval_shape(d, width):
    cfg = SAEConfig(d, width, k=8)
    W = width or 16 * d
    leaves = jax.tree.leaves(nnx.state(sae.abstract_sae(cfg), nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == sae.param_count(cfg) == 2 * d * W + W + d
    assert sae.matmul_flops_per_example(cfg) == 4 * d * W
    assert cfg.n_latents == W and cfg.to_dict() == {"d_input": d, "width": W, "k": 8}


def test_init_is_unit_norm_decoder_and_tied_encoder():
    p = TopKSAE(SAEConfig(D, WIDTH, K), rngs=nnx.Rngs(1)).arrays()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(p["w_dec"]), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(p["w_enc"]), np.asarray(p["w_dec"]).T)
    assert not np.asarray(p["b_enc"]).any() and not np.asarray(p["b_dec"]).any()


def test_forward_matches_numpy_float64_and_l0_is_exactly_k():
    cfg = SAEConfig(D, WIDTH, K)
    p = random_params(cfg)
    x = np.random.default_rng(1).standard_normal((64, D)).astype(np.float32)
    xhat, z, pre = jax.jit(sae.forward, static_argnums=2)(p, x, K)
    ref_xhat, ref_z, ref_pre = np_forward(f64(p), x.astype(np.float64), K)
    np.testing.assert_allclose(np.asarray(pre), ref_pre, rtol=1e-5, atol=1e-5)
    # The same latents are selected, with the same values; exact zeros elsewhere.
    np.testing.assert_array_equal(np.asarray(z) != 0, ref_z != 0)
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(xhat), ref_xhat, rtol=1e-5, atol=1e-5)
    assert (np.count_nonzero(np.asarray(z), axis=1) == K).all()
    m = sae.recon_metrics(x, xhat, z)
    err = ((ref_xhat - x) ** 2).sum()
    nmse = err / ((x - x.mean(0)) ** 2).sum()
    assert float(m["l0"]) == K
    assert float(m["mse"]) == pytest.approx(err / x.size, rel=1e-5)
    assert float(m["nmse"]) == pytest.approx(nmse, rel=1e-5)
    assert float(m["explained_variance"]) == pytest.approx(1 - nmse, rel=1e-5, abs=1e-6)


def test_loss_with_auxk_and_dead_counter_matches_numpy():
    cfg = SAEConfig(D, WIDTH, K)
    p = random_params(cfg, seed=2)
    x = np.random.default_rng(3).standard_normal((32, D)).astype(np.float32)
    counter = np.where(np.arange(WIDTH) % 3 == 0, 1000, 10).astype(np.int32)
    loss, (m, new_counter) = sae.sae_loss(p, x, K, tokens_since_fired_W=jnp.asarray(counter),
                                          dead_tokens=1000, aux_k=8, aux_coef=0.5)
    P64, x64 = f64(p), x.astype(np.float64)
    xhat, z, pre = np_forward(P64, x64, K)
    dead = counter >= 1000
    resid = x64 - xhat
    pre_dead = np.where(dead, pre, 0.0)
    idx = np.argsort(-pre_dead, axis=1, kind="stable")[:, :8]
    z_aux = np.zeros_like(pre)
    np.put_along_axis(z_aux, idx, np.take_along_axis(pre_dead, idx, 1), 1)
    aux = ((resid - z_aux @ P64["w_dec"]) ** 2).sum() / ((resid - resid.mean(0)) ** 2).sum()
    assert float(m["auxk_loss"]) == pytest.approx(aux, rel=1e-4)
    assert float(loss) == pytest.approx(((xhat - x64) ** 2).mean() + 0.5 * aux, rel=1e-4)
    assert float(m["dead_fraction"]) == pytest.approx(dead.mean())
    fired = (z != 0).any(0)
    np.testing.assert_array_equal(np.asarray(new_counter), np.where(fired, 0, counter + 32))


def test_decoder_rows_stay_unit_norm_through_training_steps():
    cfg = SAEConfig(D, WIDTH, K)
    spec = SAESpec(cfg, dead_tokens=64)
    graphdef, params = nnx.split(TopKSAE(cfg, rngs=nnx.Rngs(0)))
    tcfg = make_config(dict(train_dataset="x", batch_size=32, num_steps=10, use_bf16=False,
                            learning_rate=5e-2, warmup_ratio=0.0, weight_decay=0.0))
    tx, _ = make_optimizer(tcfg, 10)
    step = jax.jit(make_step(spec.loss(graphdef, tcfg), tx, accum=1,
                             post_update=spec.post_update(graphdef)))
    raw = jax.jit(make_step(spec.loss(graphdef, tcfg), tx, accum=1))  # no renormalisation
    w0 = np.asarray(params["w_dec"][...])
    opt, stats = tx.init(params), spec.init_stats()
    p_raw, opt_raw, stats_raw = params, opt, stats
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, D)) * 2, jnp.float32)
    for i in range(5):
        params, opt, stats, loss, _, aux = step(params, opt, stats, x, None, jnp.int32(i),
                                                jax.random.key(0))
        p_raw, opt_raw, stats_raw, *_ = raw(p_raw, opt_raw, stats_raw, x, None, jnp.int32(i),
                                            jax.random.key(0))
    w = np.asarray(params["w_dec"][...])
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
    assert np.abs(w - w0).max() > 1e-2  # the decoder did move
    norms_raw = np.linalg.norm(np.asarray(p_raw["w_dec"][...]), axis=1)
    assert np.abs(norms_raw - 1).max() > 1e-3  # without the hook the rows drift
    assert float(aux["l0"]) == K and set(aux) == {"nmse", "explained_variance", "l0",
                                                  "dead_fraction"}


def test_sharding_specs_of_the_sae_parameters():
    shapes = {k: v.shape for k, v in nnx.state(
        sae.abstract_sae(SAEConfig(576, 9216, 32)), nnx.Param).items()}
    # Split along the latent axis (the big one); b_dec over d; fsdp=1 replicates everything.
    want = {"w_enc": P(None, "fsdp"), "w_dec": P("fsdp", None), "b_enc": P("fsdp"),
            "b_dec": P("fsdp")}
    assert {k: param_spec(s, 4) for k, s in shapes.items()} == want
    assert {k: param_spec(s, 1) for k, s in shapes.items()} == {k: P() for k in shapes}
    assert param_spec((9216,), 4) == P("fsdp")  # the dead-latent counter


def test_bad_sae_configs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="model must be one of"):
        TrainConfig(model="bogus")
    with pytest.raises(ConfigError, match="model must be one of"):
        make_config({"model": "transcoder"})
    with pytest.raises(ConfigError, match="sae_width=8 must be >= sae_k=32"):
        make_config({"model": "sae", "sae_width": 8})
    with pytest.raises(ConfigError, match="sae_k must be >= 1"):
        make_config({"model": "sae", "sae_k": 0})
    with pytest.raises(ConfigError, match="exceeds the width"):
        SAEConfig(8, 4, 5)
    s = ActivationStore.create(tmp_path / "s", StoreMeta(model="m", layers=[0, 1], d=8,
                                                         shard_rows=256))
    x = np.ones((256, 8), np.float32)
    s.append({0: x, 1: x}, np.zeros(256), np.zeros(256))
    with pytest.raises(ConfigError, match="model=sae trains on one layer"):
        train(make_config(dict(model="sae", train_dataset=str(tmp_path / "s"), layers=[0, 1],
                               multi_layer_n_layers=2, num_steps=2, batch_size=64,
                               output_path=str(tmp_path / "r"), progress=False)))


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Sparse codes over 64 directions + noise + offset: what an SAE should recover."""
    root = tmp_path_factory.mktemp("sae")
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, D))
    for name, n in (("train", 4096), ("val", 512)):
        s = ActivationStore.create(root / name, StoreMeta(model="m", layers=[0], d=D,
                                                          shard_rows=512))
        codes = rng.exponential(1.0, (n, 64)) * (rng.random((n, 64)) < 0.06)
        x = codes @ basis + 0.05 * rng.standard_normal((n, D)) + 3.0
        s.append({0: x.astype(np.float32)}, np.zeros(n), np.zeros(n))
    return root


def _cfg(root, out, **extra):
    base = dict(model="sae", train_dataset=str(root / "train"), val_dataset=str(root / "val"),
                sae_width=WIDTH, sae_k=K, batch_size=128, num_steps=60, learning_rate=3e-3,
                weight_decay=0.0, use_bf16=False, sae_dead_tokens=512, data_mode="repeat",
                log_every_n_steps=10, eval_every_n_steps=30, eval_rows=256,
                save_every_n_steps=20, epoch_size=128 * 40, output_path=str(out),
                progress=False)
    base.update(extra)
    return base


def _rows(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(stores):
    out = stores / "run"
    train(make_config(_cfg(stores, out)))
    return out


def test_training_reduces_nmse_and_logs_the_columns(run):
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    for col in ("step", "activations_seen", "loss", "lr", "grad_norm", "activations_per_s",
                "params", "compute_6nd", "flops_exact", "nmse", "explained_variance", "l0",
                "dead_fraction"):
        assert all(col in r for r in rows), col
    for col in ("val_loss", "val_nmse", "val_explained_variance", "val_l0", "val_dead_fraction"):
        assert col in rows[2] and col in rows[5] and col not in rows[0]
    first, last = rows[0], rows[-1]
    assert first["nmse"] > 0.7 and last["nmse"] < 0.5 and last["val_nmse"] < 0.5, (first, last)
    assert last["explained_variance"] == pytest.approx(1 - last["nmse"], abs=1e-6)
    assert all(r["l0"] == K for r in rows) and last["val_l0"] == K
    n = 2 * D * WIDTH + WIDTH + D
    assert last["params"] == n and last["compute_6nd"] == 6.0 * n * 60 * 128
    assert last["flops_exact"] == 3 * 4 * D * WIDTH * 60 * 128
    resolved = json.loads((run / "run.json").read_text())
    assert resolved["model"] == "sae" and "glp" not in resolved
    assert resolved["sae"] == {"d_input": D, "width": WIDTH, "k": K}
    assert resolved["run"]["width"] == WIDTH and resolved["run"]["params"] == n
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [40, 60]  # keep_last_n=2 with epoch 1 = step 40 (log2 epochs of 5120)


def test_resume_reproduces_the_uninterrupted_run(stores, run):
    out = stores / "resumed"
    cfg = make_config(_cfg(stores, out))
    train(cfg, stop_after_steps=30)  # preempted after a checkpoint at 30 (between saves)
    assert sorted((out / "checkpoints").iterdir())[-1].name == "30"
    train(cfg)
    cols = ("loss", "grad_norm", "nmse", "dead_fraction", "val_nmse", "val_dead_fraction")
    want, got = _rows(run), _rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert any(r["dead_fraction"] > 0 for r in want)  # the restored counter matters
    for a, b in zip(want, got, strict=True):
        for c in cols:
            if c in a:
                assert b[c] == pytest.approx(a[c], rel=1e-6, abs=1e-9), (a["step"], c)
    with pytest.raises(ConfigError, match="model: run has 'sae', now 'glp'"):
        train(make_config({**_cfg(stores, out), "model": "glp"}))


def test_load_reconstructs_like_numpy_from_the_restored_params(run, stores):
    loaded = glp_jax.load(run)
    assert isinstance(loaded, LoadedSAE) and loaded.step == 60 and loaded.name == "sae"
    desc = loaded.describe()
    assert desc["method"] == "sae" and desc["width"] == WIDTH and desc["k"] == K
    # Restored parameters straight from the checkpoint (orbax, no glp_jax.load involved).
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(run / "checkpoints" / "60" / "state")["params"]
    P64 = {k: np.asarray(v["value"] if isinstance(v, dict) else v, np.float64)
           for k, v in state.items()}
    for k in P64:
        np.testing.assert_array_equal(np.asarray(loaded.params[k]), P64[k])
    np.testing.assert_allclose(np.linalg.norm(P64["w_dec"], axis=1), 1.0, rtol=1e-6)
    stats = np.load(io.BytesIO((run / "normalizer.npz").read_bytes()))
    acts = ActivationStore.open(stores / "val").read_rows(np.arange(300), layer=0)
    acts64 = np.asarray(acts, np.float64)
    xn = (acts64 - stats["mean"]) / stats["std"]
    xhat, z, _ = np_forward(P64, xn, K)
    ref = xhat * stats["std"] + stats["mean"]
    loaded.chunk = 128  # 300 rows: chunks of 128, the last one padded
    rec = loaded(acts)
    np.testing.assert_allclose(rec, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(loaded.reconstruct(acts[:5]), ref[:5], rtol=1e-5,
                               atol=1e-4 * np.abs(ref).max())
    lat = loaded.encode(acts)
    assert lat.shape == (300, WIDTH) and (np.count_nonzero(lat, axis=1) == K).all()
    np.testing.assert_array_equal(lat != 0, z != 0)
    np.testing.assert_allclose(loaded.decode(lat), rec, rtol=1e-6, atol=1e-5)
    ev = 1 - ((rec - acts64) ** 2).sum() / ((acts64 - acts64.mean(0)) ** 2).sum()
    assert ev > 0.5


def test_sharded_cli_run_matches_one_device(stores, run, tmp_path):
    """`glp train model=sae` on 4 simulated devices (2 data x 2 fsdp): the same trajectory."""
    args = [f"{k}={v}" for k, v in _cfg(stores, tmp_path / "r4", mesh_data=2, mesh_fsdp=2,
                                        num_steps=60).items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLP_CPU_DEVICES": "4"}
    proc = subprocess.run([sys.executable, "-m", "glp_jax", "train", *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _rows(run), _rows(tmp_path / "r4")
    assert got[-1]["devices"] == 4
    for a, b in zip(want, got, strict=True):
        for c in ("loss", "nmse", "val_nmse"):
            if c in a:
                assert b[c] == pytest.approx(a[c], rel=2e-4), (a["step"], c)


def test_cpu_config_and_aot_compile():
    from pathlib import Path

    from glp_jax.config import load_config
    from glp_jax.train import compile_step, sae_config_for

    path = Path(__file__).resolve().parents[1] / "experiments" / "cpu" / "sae.yaml"
    cfg = load_config([f"config={path}"])
    assert cfg.model == "sae" and cfg.sae_k == 32
    assert sae_config_for(cfg, 576) == SAEConfig(576, 8 * 576, 32)
    small = make_config({**cfg.to_dict(), "batch_size": 64})
    res = compile_step(small, SAEConfig(32, 256, 8))
    # XLA's count covers at least the three matmuls of forward + backward per Linear.
    assert res["flops"] >= 3 * sae.matmul_flops_per_example(SAEConfig(32, 256, 8)) * 64
