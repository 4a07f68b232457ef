"""Flow matching (GLP_SPEC.md section 3) as pure, jit-able functions with sigma explicit.

sigma in [0, 1] is the noise level: data at 0, noise at 1 (the original code's `u` is
1 - sigma). All inputs are already-normalised activations; (de)normalisation is the
caller's job. `apply_fn(z_BxD, sigma_B) -> v_BxD` is any velocity model, e.g.
`lambda z, s: model(z, s, layer_idx_B)`; the network itself turns sigma into 1000*sigma.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# diffusers FlowMatchEulerDiscreteScheduler: sigma_min is the fp32 value of 1/1000.
SIGMA_MIN = float(np.float32(1.0) / np.float32(NUM_TRAIN_TIMESTEPS))

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_row(sigma, x: jax.Array) -> jax.Array:
    """Scalar or [B] sigma as a column broadcastable against x [B, ...]."""
    s = jnp.asarray(sigma, jnp.float32)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim)) if s.ndim else s


def _sigma_B(sigma, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))


def add_noise(x_BxD: jax.Array, eps_BxD: jax.Array, sigma_B) -> jax.Array:
    """z = (1 - sigma) x + sigma eps."""
    s = _per_row(sigma_B, x_BxD)
    return (1.0 - s) * x_BxD + s * eps_BxD


def velocity_target(x_BxD: jax.Array, eps_BxD: jax.Array) -> jax.Array:
    """dz/dsigma = eps - x, what the network regresses."""
    return eps_BxD - x_BxD


def flow_loss(v_pred_BxD: jax.Array, target_BxD: jax.Array) -> jax.Array:
    """Plain MSE over batch and dimensions (fp32), no sigma weighting (as the original)."""
    diff = v_pred_BxD.astype(jnp.float32) - target_BxD.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))


def sample_train_sigma(key: jax.Array, batch: int, discrete: bool = True) -> jax.Array:
    """One training sigma per example, [B] fp32.

    discrete (the original): sigma = 1 - floor(1000 u)/1000, u ~ U[0, 1), i.e. uniform over
    {0.001, ..., 1.000}. Read from the host-computed diffusers 1000-step grid (the original
    indexes `scheduler.sigmas` the same way) rather than divided on device: XLA's
    k / 1000 is not correctly rounded (on CPU here 584 of the 1000 values were an ulp off).
    continuous: sigma = 1 - u, uniform on (0, 1].
    """
    if discrete:
        k = jax.random.randint(key, (batch,), 0, NUM_TRAIN_TIMESTEPS)
        return jnp.asarray(euler_grid_np(NUM_TRAIN_TIMESTEPS)[:-1])[k]
    return 1.0 - jax.random.uniform(key, (batch,), jnp.float32)


def clean_estimate(z_BxD: jax.Array, v_BxD: jax.Array, sigma_B) -> jax.Array:
    """x0 = z - sigma v: the data point the current velocity points back to."""
    return z_BxD - _per_row(sigma_B, z_BxD) * v_BxD


def euler_grid(n_steps: int) -> jax.Array:
    """diffusers FlowMatchEulerDiscrete sigmas (shift 1) for N steps, plus a final 0: [N+1].

    timesteps = linspace(1000 sigma_max, 1000 sigma_min, N) in float64, sigma = t/1000,
    rounded to fp32 (sigma_max = 1, sigma_min = fp32(0.001)); computed on the host since N
    is static.
    """
    return jnp.asarray(euler_grid_np(n_steps))


def euler_grid_np(n_steps: int) -> np.ndarray:
    """`euler_grid` as a host numpy array (usable for static indexing inside jit)."""
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps}: need at least one Euler step")
    t = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, SIGMA_MIN * NUM_TRAIN_TIMESTEPS, n_steps)
    sigmas = (t / NUM_TRAIN_TIMESTEPS).astype(np.float32)
    return np.append(sigmas, np.float32(0.0))


def integrate(apply_fn: ApplyFn, z_BxD: jax.Array, sigmas: jax.Array) -> jax.Array:
    """Euler from sigmas[0] down to sigmas[-1]: z += (s_next - s) v(z, s); len-1 calls.

    The state is kept in fp32 (diffusers upcasts the sample for the update too).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    z = z_BxD.astype(jnp.float32)
    B = z.shape[0]

    def step(z, s_pair):
        s, s_next = s_pair
        v = apply_fn(z, _sigma_B(s, B)).astype(jnp.float32)
        return z + (s_next - s) * v, None

    z, _ = jax.lax.scan(step, z, (sigmas[:-1], sigmas[1:]))
    return z


def sample(apply_fn: ApplyFn, key: jax.Array, shape: tuple[int, int], n_steps: int) -> jax.Array:
    """Normalised samples: start from N(0, I) at sigma 1, n_steps Euler steps to 0."""
    z = jax.random.normal(key, shape, jnp.float32)
    return integrate(apply_fn, z, euler_grid_np(n_steps))


def projection_grid(convention: str = "code", sigma0: float = 0.5,
                    n_steps: int = 20) -> np.ndarray:
    """The sigma grid of on-manifold projection, starting at the actual noise level.

    code (default, what produced the published numbers): the n_steps diffusers grid entered
    at index floor((1 - sigma0) * n_steps) -> for 0.5 and 20: sigma 0.474211, 10 steps.
    paper: linspace(sigma0, 0, n_steps) -> sigma 0.5 exactly, n_steps - 1 steps.
    """
    if not 0.0 < sigma0 <= 1.0:
        raise ValueError(f"sigma0={sigma0}: must be in (0, 1]")
    if convention == "code":
        start = int(np.floor((1.0 - sigma0) * n_steps + 1e-9))  # the original's int(u * N)
        return euler_grid_np(n_steps)[min(start, n_steps - 1):]
    if convention == "paper":
        return np.linspace(sigma0, 0.0, n_steps).astype(np.float32)
    raise ValueError(f"convention={convention!r}: use 'code' or 'paper'")


def project_on_manifold(apply_fn: ApplyFn, x_normed_BxD: jax.Array, key: jax.Array,
                        convention: str = "code", sigma0: float = 0.5,
                        n_steps: int = 20) -> jax.Array:
    """SDEdit-style projection: noise to sigma0 with fresh eps, Euler-integrate to 0.

    See `projection_grid` for the two conventions. Returns fp32, still normalised.
    """
    sigmas = jnp.asarray(projection_grid(convention, sigma0, n_steps))
    x = x_normed_BxD.astype(jnp.float32)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    z = add_noise(x, eps, sigmas[0])
    return integrate(apply_fn, z, sigmas)


def meta_neurons(model_apply_with_meta: Callable, x_normed_BxD: jax.Array, key: jax.Array,
                 sigma) -> jax.Array:
    """Meta-neuron features [B, n_layers * H]: noise once to sigma, one forward pass.

    model_apply_with_meta(z_BxD, sigma_B) -> (v_BxD, a_LxBxH). Feature l * H + j is
    meta-neuron j of block l.
    """
    x = x_normed_BxD.astype(jnp.float32)
    B = x.shape[0]
    sigma_B = _sigma_B(sigma, B)
    eps = jax.random.normal(key, x.shape, jnp.float32)
    _, a_LxBxH = model_apply_with_meta(add_noise(x, eps, sigma_B), sigma_B)
    return jnp.transpose(a_LxBxH, (1, 0, 2)).reshape(B, -1)
