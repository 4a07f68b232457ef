"""Flow matching: grids vs diffusers' formula, Euler vs closed forms, sigma sampling, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glp_jax import flow
from glp_jax.model import GLPConfig, abstract_glp


def diffusers_sigmas(n_steps):
    """FlowMatchEulerDiscreteScheduler() (defaults) then set_timesteps(N), in numpy."""
    init_t = np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy()
    init_sigmas = init_t / np.float32(1000)  # torch float32 tensor / int
    sigma_max, sigma_min = float(init_sigmas[0]), float(init_sigmas[-1])
    t = np.linspace(sigma_max * 1000, sigma_min * 1000, n_steps)
    sigmas = (t / 1000).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


@pytest.mark.parametrize("n", [1, 2, 20, 100, 1000])
def test_euler_grid_is_diffusers(n):
    grid = np.asarray(flow.euler_grid(n))
    assert grid.dtype == np.float32 and grid.shape == (n + 1,)
    np.testing.assert_array_equal(grid, diffusers_sigmas(n))
    assert grid[0] == 1.0 and grid[-1] == 0.0
    if n > 1:
        assert grid[-2] == np.float32(0.001)


def test_projection_grids():
    code = flow.projection_grid("code")
    assert abs(code[0] - 0.474211) < 1e-6
    assert abs(code[0] - np.linspace(1000, 1, 20)[10] / 1000) < 1e-7
    assert len(code) - 1 == 10 and code[-1] == 0
    np.testing.assert_array_equal(code, diffusers_sigmas(20)[10:])
    paper = flow.projection_grid("paper")
    assert len(paper) - 1 == 19 and paper[0] == 0.5 and paper[-1] == 0
    np.testing.assert_allclose(paper, np.linspace(0.5, 0, 20), atol=1e-7)
    # u = 0.1 in the original (a fork's choice) = sigma0 0.9: start index int(0.1 * 20) = 2.
    assert len(flow.projection_grid("code", sigma0=0.9)) - 1 == 18
    with pytest.raises(ValueError, match="convention"):
        flow.projection_grid("sdedit")


def test_noise_target_clean_estimate_and_loss():
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 5, 7)).astype(np.float32)
    s = rng.uniform(0, 1, 5).astype(np.float32)
    z = np.asarray(flow.add_noise(x, eps, s))
    np.testing.assert_allclose(z, (1 - s[:, None]) * x + s[:, None] * eps, rtol=1e-6,
                               atol=1e-6)
    v = np.asarray(flow.velocity_target(x, eps))
    np.testing.assert_array_equal(v, eps - x)
    # With the true velocity the clean estimate recovers x.
    np.testing.assert_allclose(np.asarray(flow.clean_estimate(z, v, s)), x, atol=1e-5)
    np.testing.assert_allclose(np.asarray(flow.add_noise(x, eps, 0.25)), 0.75 * x + 0.25 * eps,
                               rtol=1e-6, atol=1e-6)
    pred = rng.standard_normal((5, 7)).astype(np.float32)
    mse = np.mean((pred.astype(np.float64) - v) ** 2)
    np.testing.assert_allclose(float(flow.flow_loss(pred, v)), mse, rtol=1e-6)
    np.testing.assert_allclose(float(flow.flow_loss(jnp.asarray(pred, jnp.bfloat16), v)),
                               np.mean((np.asarray(jnp.asarray(pred, jnp.bfloat16),
                                                   np.float64) - v) ** 2), rtol=1e-6)


def test_discrete_train_sigma_support():
    sigma = np.asarray(jax.jit(flow.sample_train_sigma, static_argnums=1)(
        jax.random.key(0), 200_000))
    assert sigma.dtype == np.float32 and sigma.shape == (200_000,)
    support = np.unique(sigma)
    # Exactly the 1000 values of diffusers' 1000-step grid, i.e. {0.001, ..., 1.000}.
    np.testing.assert_array_equal(support, np.sort(diffusers_sigmas(1000)[:-1]))
    np.testing.assert_array_equal(support, (np.arange(1, 1001) / 1000).astype(np.float32))
    counts = np.unique(sigma, return_counts=True)[1]
    assert counts.min() > 100 and counts.max() < 310  # ~200 each: uniform


def test_continuous_train_sigma():
    sigma = np.asarray(flow.sample_train_sigma(jax.random.key(1), 100_000, discrete=False))
    assert sigma.min() > 0 and sigma.max() <= 1
    assert len(np.unique(sigma)) > 50_000 and abs(sigma.mean() - 0.5) < 0.01


def test_euler_linear_field_matches_closed_form():
    """v = A z: Euler is z_N = prod_i (I + (s_{i+1} - s_i) A) z_0, in float64 numpy."""
    rng = np.random.default_rng(0)
    A = (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)
    z0 = rng.standard_normal((3, 4)).astype(np.float32)
    sigmas = np.asarray(flow.euler_grid(20), np.float64)
    out = jax.jit(lambda z: flow.integrate(lambda z, s: z @ A.T, z, flow.euler_grid(20)))(z0)
    M = np.eye(4)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        M = (np.eye(4) + (s_next - s) * A.astype(np.float64)) @ M
    np.testing.assert_allclose(np.asarray(out), z0 @ M.T, rtol=1e-5, atol=1e-5)


def test_euler_sigma_dependent_field():
    """v = z * s (uses sigma_B per row): each step multiplies by 1 + (s' - s) s."""
    z0 = np.ones((2, 3), np.float32)
    sig = np.asarray(flow.euler_grid(7), np.float64)
    expected = np.prod(1 + (sig[1:] - sig[:-1]) * sig[:-1])
    out = flow.integrate(lambda z, s: z * s[:, None], z0, flow.euler_grid(7))
    np.testing.assert_allclose(np.asarray(out), expected * z0, rtol=1e-6)


def point_mass_velocity(x_star):
    """The exact flow velocity when the data is the single point x*: (z - x*) / sigma.
    Its paths are straight lines, so Euler on any grid lands exactly on x*."""
    return lambda z, s: (z - x_star) / s[:, None]


def test_sample_and_projection_reach_point_mass():
    x_star = np.array([[1.5, -2.0, 0.25]], np.float32).repeat(4, 0)
    apply_fn = point_mass_velocity(x_star)
    out = jax.jit(lambda k: flow.sample(apply_fn, k, (4, 3), 20))(jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out), x_star, atol=1e-5)
    far = np.zeros_like(x_star) + 10.0
    for convention in ("code", "paper"):
        proj = flow.project_on_manifold(apply_fn, far, jax.random.key(1), convention)
        np.testing.assert_allclose(np.asarray(proj), x_star, atol=1e-4)


def test_projection_noises_to_sigma0_and_counts_steps():
    calls = []

    def apply_fn(z, s):
        calls.append(s.shape)
        return jnp.zeros_like(z)  # zero velocity: the output is the noised input

    x = np.zeros((2, 5), np.float32)
    key = jax.random.key(3)
    out = flow.project_on_manifold(apply_fn, x, key, "code")
    eps = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), flow.projection_grid("code")[0] * eps,
                               rtol=1e-6)
    assert calls == [(2,)]  # traced once inside the scan, sigma per row

    for convention, n_steps in (("code", 10), ("paper", 19)):
        jaxpr = str(jax.make_jaxpr(lambda x, c=convention: flow.project_on_manifold(
            lambda z, s: z, x, key, c))(x))
        assert f"length={n_steps}" in jaxpr  # one scan with that many Euler steps


def test_meta_neurons_layout():
    cfg = GLPConfig(8, 3)
    model = abstract_glp(cfg)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        obj = model
        for name in path:
            obj = getattr(obj, name)
        shape = var.get_value().shape
        obj.set_value(jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.float32))
    x = rng.standard_normal((4, 8)).astype(np.float32)
    key = jax.random.key(7)
    apply_meta = lambda z, s: model(z, s, return_meta=True)  # noqa: E731
    feats = jax.jit(lambda x, k: flow.meta_neurons(apply_meta, x, k, 0.1))(x, key)
    assert feats.shape == (4, 3 * cfg.mlp_width)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    _, a = model(flow.add_noise(x, eps, 0.1), jnp.full((4,), 0.1), return_meta=True)
    a = np.asarray(a)
    feats = np.asarray(feats)
    H = cfg.mlp_width
    for layer in range(3):  # block-major: feature l * H + j is neuron j of block l
        np.testing.assert_allclose(feats[:, layer * H:(layer + 1) * H], a[layer], atol=1e-5)
