"""GLP denoiser: exact sizes, forward vs an independent float64 numpy implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glp_jax.errors import ConfigError
from glp_jax.model import (
    GLP,
    PRESETS,
    GLPConfig,
    Normalizer,
    abstract_glp,
    matmul_flops_per_example,
    model_info,
    param_count,
    timestep_embedding,
)

# GLP_SPEC.md section 2, parameter table (exact).
SPEC_PARAMS = [
    (GLPConfig(2048, 3), 453_117_952),
    (GLPConfig(2048, 6), 855_881_728),
    (GLPConfig(2048, 12), 1_661_409_280),
    (GLPConfig(2048, 24), 3_272_464_384),
    (GLPConfig(2048, 12, multi_layer_n_layers=16), 1_694_971_904),
    (GLPConfig(4096, 6), 3_423_039_488),
    (GLPConfig(576, 3), 35_869_248),
    (GLPConfig(576, 6), 67_750_848),
    (GLPConfig(576, 12), 131_514_048),
    (GLPConfig(576, 24), 259_040_448),
]


@pytest.mark.parametrize("cfg,expected", SPEC_PARAMS, ids=lambda v: str(v))
def test_param_count_matches_spec(cfg, expected):
    assert param_count(cfg) == expected


def test_presets_and_widths():
    cfg = PRESETS["glp-llama8b-d6"].resolved()
    assert (cfg.d_input, cfg.d_model, cfg.d_mlp, cfg.n_layers) == (4096, 8192, 16384, 6)
    assert param_count(PRESETS["glp-llama1b-d12-multi"]) == 1_694_971_904
    assert GLPConfig(8, 2, d_model=12, d_mlp=20).resolved().to_dict() == {
        "d_input": 8, "n_layers": 2, "d_model": 12, "d_mlp": 20, "multi_layer_n_layers": None}


def test_abstract_model_is_stacked_and_not_allocated():
    m = abstract_glp(PRESETS["glp-llama1b-d24"])
    k = m.blocks.gate_proj.kernel.get_value()
    assert isinstance(k, jax.ShapeDtypeStruct) and k.shape == (24, 4096, 8192)
    assert m.blocks.down_proj.kernel.get_value().shape == (24, 8192, 4096)


@pytest.mark.parametrize("cfg", [c for c, _ in SPEC_PARAMS] + [GLPConfig(8, 2, 12, 20, 4)])
def test_matmul_flops_equal_sum_over_kernels(cfg):
    """2 * in * out summed over every kernel leaf (stacked ones count n_layers times)."""
    state = nnx.state(abstract_glp(cfg), nnx.Param)
    kernels = [v.get_value() for p, v in nnx.to_flat_state(state) if p[-1] == "kernel"]
    assert matmul_flops_per_example(cfg) == sum(2 * math.prod(k.shape) for k in kernels)


def test_model_info():
    info = model_info({"preset": "smollm2-d3"})
    assert info["params"] == 35_869_248 and info["d_model"] == 1152 and info["d_mlp"] == 2304
    assert info["train_flops_per_activation_6N"] == 6 * 35_869_248
    assert info["train_flops_per_activation_matmul"] == 3 * matmul_flops_per_example(
        GLPConfig(576, 3))
    # CLI strings, and a preset with a changed depth.
    assert model_info({"d_input": "576", "n_layers": "24"})["params"] == 259_040_448
    assert model_info({"preset": "glp-llama1b-d3", "n_layers": "6"})["params"] == 855_881_728
    assert model_info({"preset": "glp-llama1b-d12", "multi_layer_n_layers": "16"})[
        "params"] == 1_694_971_904
    with pytest.raises(ConfigError, match="preset"):
        model_info({"n_layers": 3})
    with pytest.raises(ConfigError, match="unknown GLPConfig keys"):
        model_info({"preset": "smollm2-d3", "depth": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        model_info({"preset": "nope"})


def test_config_validation():
    with pytest.raises(ConfigError, match="n_layers"):
        GLPConfig(8, 0)
    with pytest.raises(ConfigError, match="multi_layer_n_layers"):
        GLPConfig(8, 2, multi_layer_n_layers=1)
    with pytest.raises(ConfigError, match="d_model"):
        GLPConfig.from_dict({"d_input": 8, "n_layers": 2, "d_model": "${x}"})


def test_pytorch_default_init():
    m = GLP(GLPConfig(64, 2), rngs=nnx.Rngs(0))  # the real (eager) init
    for lin, fan_in in [(m.in_proj, 64), (m.out_proj, 128), (m.time_embed.fc1, 128)]:
        bound = 1 / math.sqrt(fan_in)
        for w in (np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])):
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    down = np.asarray(m.blocks.down_proj.kernel[...])  # fan_in = H = 256
    assert np.abs(down).max() <= 1 / 16 and not np.allclose(down[0], down[1])
    assert np.all(np.asarray(m.blocks.ln.scale[...]) == 1)
    assert np.all(np.asarray(m.ln.bias[...]) == 0)


# ---------------------------------------------------------------- numpy float64 reference


def np_embedding(t_B, dim):
    """The spec's fp32 embedding: the argument t * f is formed in fp32 (as in the original
    and in glp_jax), the cos/sin in float64. Rounding the argument like the implementation
    does removes the only intrinsic fp32 error (t up to 1000 -> ulp 6e-5) from the check."""
    half = dim // 2
    f32 = np.exp(-np.log(10000.0) * np.arange(half) / half).astype(np.float32)
    args = (np.asarray(t_B, np.float32)[:, None] * f32[None]).astype(np.float64)
    return np.concatenate([np.cos(args), np.sin(args)], -1)


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def np_forward(P, x, sigma, layer_idx=None, n_llm_layers=None):
    """Float64 GLP forward from a {dotted.path: array} dict of JAX-layout params."""
    lin = lambda h, name: h @ P[f"{name}.kernel"] + P[f"{name}.bias"]  # noqa: E731
    D = P["in_proj.kernel"].shape[1]
    t = np.float32(1000) * np.asarray(sigma, np.float32)
    e = lin(np_silu(lin(np_embedding(t, D), "time_embed.fc1")), "time_embed.fc2")
    if layer_idx is not None:
        depth = np.asarray(layer_idx, np.float32) / np.float32(n_llm_layers - 1)
        e = e + lin(np_silu(lin(np_embedding(depth, D), "layer_embed.fc1")), "layer_embed.fc2")
    h = lin(x, "in_proj")
    acts = []
    for i in range(P["blocks.ln.scale"].shape[0]):
        Pi = {k[len("blocks."):]: v[i] for k, v in P.items() if k.startswith("blocks.")}
        y = np_ln(h, Pi["ln.scale"], Pi["ln.bias"])
        m = (y @ Pi["gate_proj.kernel"] + Pi["gate_proj.bias"]) * (
            e @ Pi["time_proj.kernel"] + Pi["time_proj.bias"])
        a = np_silu(m) * (y @ Pi["up_proj.kernel"] + Pi["up_proj.bias"])
        acts.append(a)
        h = h + a @ Pi["down_proj.kernel"] + Pi["down_proj.bias"]
    v = lin(np_ln(h, P["ln.scale"], P["ln.bias"]), "out_proj")
    return v, np.stack(acts)


def random_model(cfg, seed=0):
    """A tiny GLP filled from numpy (no init compile); LayerNorm params random too, since
    the default 1/0 would hide bugs in their use."""
    model = abstract_glp(cfg)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        else:  # biases and LayerNorm shifts; LayerNorm scales around 1
            value = (path[-1] == "scale") + 0.2 * rng.standard_normal(shape)
        obj = model
        for name in path:
            obj = getattr(obj, name)
        obj.set_value(jnp.asarray(value, jnp.float32))
    return model


def params_f64(model):
    return {".".join(p): np.asarray(v.get_value(), np.float64)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def inputs(B, d, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, d)).astype(np.float32)
    sigma = np.concatenate([[0.001, 1.0], rng.uniform(0, 1, B - 2)]).astype(np.float32)
    return x, sigma


# fp32 vs float64: inputs, weights and activations are O(1) and every contraction is over
# <= 64 terms, so the fp32 rounding error is ~ sqrt(64) * 2^-24 * depth ~ 1e-6 (measured
# <= 3e-7); 5e-6 leaves margin while any formula error (missing bias, swapped cos/sin, wrong order) is >= 1e-2.
ATOL = 5e-6


@pytest.mark.parametrize("cfg", [GLPConfig(8, 2), GLPConfig(8, 3, d_model=12, d_mlp=20)])
def test_forward_matches_numpy_float64(cfg):
    model = random_model(cfg)
    x, sigma = inputs(6, cfg.d_input)
    v, a = jax.jit(lambda x, s: model(x, s, return_meta=True))(x, sigma)
    v_ref, a_ref = np_forward(params_f64(model), x.astype(np.float64), sigma)
    assert v.dtype == jnp.float32 and v.shape == (6, cfg.d_input)
    assert a.shape == (cfg.n_layers, 6, cfg.mlp_width)
    np.testing.assert_allclose(np.asarray(v), v_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(a), a_ref, rtol=0, atol=ATOL)


def test_multi_layer_forward_matches_numpy_float64():
    cfg = GLPConfig(8, 2, multi_layer_n_layers=16)
    model = random_model(cfg, seed=3)
    x, sigma = inputs(6, 8, seed=4)
    layer = np.array([0, 15, 7, 3, 7, 12])
    fwd = jax.jit(lambda x, s, li: model(x, s, li, return_meta=True))
    v, a = fwd(x, sigma, layer)
    v_ref, a_ref = np_forward(params_f64(model), x.astype(np.float64), sigma, layer, 16)
    np.testing.assert_allclose(np.asarray(v), v_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(a), a_ref, rtol=0, atol=ATOL)
    # The layer matters, and forgetting it is an error rather than a silent default.
    v_other, _ = fwd(x, sigma, np.zeros(6, np.int32))
    assert np.abs(np.asarray(v_other) - np.asarray(v)).max() > 1e-3
    with pytest.raises(ValueError, match="layer_idx_B"):
        model(x, sigma)


def test_timestep_embedding_matches_numpy():
    t = np.array([0.0, 1.0, 474.2105, 999.0, 1000.0], np.float32)
    emb = np.asarray(timestep_embedding(t, 10))
    np.testing.assert_allclose(emb, np_embedding(t, 10), rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb[0], [1] * 5 + [0] * 5)  # cos first
    assert np.asarray(timestep_embedding(t, 7)).shape == (5, 7)  # odd dim: zero column
    assert np.all(np.asarray(timestep_embedding(t, 7))[:, -1] == 0)


def test_bf16_compute_close_to_fp32():
    """bf16 matmuls (unit roundoff 2^-9 ~ 2e-3, fp32 accumulation) through ~7 chained
    Linears give a few 1e-3 relative error; 3e-2 on the relative L2 norm leaves margin."""
    cfg = GLPConfig(32, 3)
    model = random_model(cfg)
    x, sigma = inputs(16, 32)
    fwd = jax.jit(lambda x, s, dtype: model(x, s, return_meta=True, compute_dtype=dtype),
                  static_argnums=2)
    v32, a32 = fwd(x, sigma, jnp.float32)
    v16, a16 = fwd(x, sigma, jnp.bfloat16)
    assert v16.dtype == jnp.float32 and a16.dtype == jnp.float32
    assert model.in_proj.kernel[...].dtype == jnp.float32  # params stay fp32
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    assert 0 < rel(v16, v32) < 3e-2
    assert rel(a16, a32) < 3e-2


def test_blocks_run_in_one_scan():
    model = random_model(GLPConfig(8, 5))
    jaxpr = str(jax.make_jaxpr(lambda x: model(x, 0.5))(jnp.zeros((2, 8))))
    assert jaxpr.count("scan[") == 1 and "length=5" in jaxpr


def test_jit_with_split_state_and_grad():
    """The functional pattern the trainer uses: split, merge inside jit, grad wrt state."""
    model = random_model(GLPConfig(8, 2))
    graphdef, state = nnx.split(model)
    x, sigma = inputs(4, 8)

    @jax.jit
    def loss(state, x, s):
        return jnp.mean(nnx.merge(graphdef, state)(x, s, compute_dtype=jnp.bfloat16) ** 2)

    g = jax.grad(loss)(state, x, sigma)
    gk = g["blocks"]["gate_proj"]["kernel"][...]
    assert gk.shape == (2, 8 * 2, 8 * 4) and gk.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(gk))) and float(jnp.abs(gk).max()) > 0


# ---------------------------------------------------------------- normalizer


def test_normalizer_roundtrip_and_floor():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(5)
    var = np.array([1.0, 4.0, 0.25, 0.0, -1e-9])  # a dead dim and E[x^2]-E[x]^2 rounding
    n = Normalizer.from_moments(mean, var)
    floor = 1e-8 * np.abs(var).mean()
    np.testing.assert_allclose(np.asarray(n.var), np.maximum(var, floor).astype(np.float32))
    assert np.all(np.isfinite(np.asarray(n.std))) and np.all(np.asarray(n.std) > 0)
    x = rng.standard_normal((3, 5)).astype(np.float32) * 2 + 1
    z = n.normalize(x)
    np.testing.assert_allclose(np.asarray(z)[:, :3], (x[:, :3] - mean[:3]) / np.sqrt(var[:3]),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(n.denormalize(z))[:, :3], x[:, :3], rtol=1e-5,
                               atol=1e-5)
    # A pytree: goes through jit.
    np.testing.assert_allclose(np.asarray(jax.jit(lambda n, x: n.normalize(x))(n, x)),
                               np.asarray(z))
    with pytest.raises(ValueError, match="NaN"):
        Normalizer.from_moments(mean, np.full(5, np.nan))


def test_normalizer_multi_layer_indexing():
    rng = np.random.default_rng(1)
    mean, var = rng.standard_normal((4, 3)), rng.uniform(0.5, 2, (4, 3))
    n = Normalizer.from_moments(mean, var)
    assert n.n_layers == 4 and n.d == 3
    x = rng.standard_normal((5, 3)).astype(np.float32)
    pos = np.array([0, 3, 1, 1, 2])
    ref = (x - mean[pos]) / np.sqrt(var[pos])
    np.testing.assert_allclose(np.asarray(n.normalize(x, pos)), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(n.normalize(x, 2)), (x - mean[2]) / np.sqrt(var[2]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(n.denormalize(n.normalize(x, pos), pos)), x,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer_pos"):
        n.normalize(x)
