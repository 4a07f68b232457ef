"""A TopK sparse autoencoder (Gao et al. 2024), the GLP's baseline, in Flax NNX.

    pre_BxW  = ReLU((x_BxD - b_dec) @ w_enc + b_enc)       encoder, d -> width
    z_BxW    = pre at each row's top-k entries, exact zeros elsewhere (jax.lax.top_k)
    xhat_BxD = z_BxW @ w_dec + b_dec                        decoder, width -> d

x is a NORMALISED activation (the run's per-dimension z-score, the same as the GLP's), so
a reconstruction in raw space is denormalize(decode(encode(normalize(x)))).
Decoder rows (w_dec[i], one per latent) have unit norm: initialised so, and renormalised
after every optimizer update (`renormalize_decoder`, the trainer's post-update hook), not
parametrised. Init: w_dec rows random unit directions, w_enc = w_dec^T, biases 0 (b_dec = 0
is the mean of normalised data). Loss: MSE on normalised activations, plus optionally
AuxK (k_aux dead latents reconstructing the residual; off unless aux_k > 0).

Dead latents are tracked in the training state: `tokens_since_fired` [width] counts the
training tokens since each latent was last non-zero; a latent is dead once that reaches
`dead_tokens`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax.chunks import map_rows
from glp_jax.errors import ConfigError

COUNTER_CAP = 2**30  # tokens_since_fired saturates here (int32)


@dataclass(frozen=True)
class SAEConfig:
    """SAE shape: d_input (the LLM width), width (latents; default 16 * d_input), k."""

    d_input: int
    width: int | None = None
    k: int = 32

    def __post_init__(self):
        for key in ("d_input", "width", "k"):
            v = getattr(self, key)
            if v is None and key == "width":
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ConfigError(f"SAEConfig.{key}={v!r}: must be a positive integer")
            object.__setattr__(self, key, int(v))
        if self.k > self.n_latents:
            raise ConfigError(f"SAEConfig.k={self.k} exceeds the width {self.n_latents}; "
                              f"lower sae_k or raise sae_width")

    @staticmethod
    def from_expansion(d_input: int, expansion: int = 16, k: int = 32) -> SAEConfig:
        return SAEConfig(d_input=d_input, width=expansion * d_input, k=k)

    @property
    def n_latents(self) -> int:
        return int(self.width) if self.width is not None else 16 * int(self.d_input)

    def resolved(self) -> SAEConfig:
        return dataclasses.replace(self, width=self.n_latents)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self.resolved())

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ConfigError(f"unknown SAEConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**obj)


# ---------------------------------------------------------------------------- module


class TopKSAE(nnx.Module):
    """Parameters: w_enc [d, W], b_enc [W], w_dec [W, d] (unit-norm rows), b_dec [d]."""

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        cfg = cfg.resolved()
        self.cfg = cfg
        d, W = cfg.d_input, cfg.n_latents
        w = jax.random.normal(rngs.params(), (W, d), jnp.float32)
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        self.w_dec = nnx.Param(w.astype(param_dtype))
        self.w_enc = nnx.Param(w.T.astype(param_dtype))
        self.b_enc = nnx.Param(jnp.zeros((W,), param_dtype))
        self.b_dec = nnx.Param(jnp.zeros((d,), param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {k: getattr(self, k)[...] for k in ("w_enc", "b_enc", "w_dec", "b_dec")}

    def __call__(self, x_BxD, *, compute_dtype=None):
        """(reconstruction [B, d], latents [B, W], ReLU pre-activations [B, W]), all fp32."""
        return forward(self.arrays(), x_BxD, self.cfg.k, compute_dtype)


# ---------------------------------------------------------------------------- pure math


def _dot(a, b, dtype):
    dtype = jnp.dtype(dtype or jnp.float32)
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def pre_activations(p, x_BxD, compute_dtype=None):
    """ReLU(encoder) [B, W] in fp32, before the top-k."""
    return jax.nn.relu(_dot(jnp.asarray(x_BxD, jnp.float32) - p["b_dec"], p["w_enc"],
                            compute_dtype) + p["b_enc"])


def topk(pre_BxW, k: int):
    """Each row's k largest entries kept, exact zeros elsewhere (ties: lower index wins)."""
    vals_BxK, idx_BxK = jax.lax.top_k(pre_BxW, k)
    return jnp.put_along_axis(jnp.zeros_like(pre_BxW), idx_BxK, vals_BxK, axis=-1,
                              inplace=False)


def decode(p, z_BxW, compute_dtype=None):
    return _dot(z_BxW, p["w_dec"], compute_dtype) + p["b_dec"]


def encode(p, x_BxD, k: int, compute_dtype=None):
    return topk(pre_activations(p, x_BxD, compute_dtype), k)


def forward(p, x_BxD, k: int, compute_dtype=None):
    pre = pre_activations(p, x_BxD, compute_dtype)
    z = topk(pre, k)
    return decode(p, z, compute_dtype), z, pre


def renormalize_decoder(p):
    """Decoder rows back to unit norm (after an optimizer update); other params as they are."""
    w = p["w_dec"]
    return {**p, "w_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)}


def recon_metrics(x_BxD, xhat_BxD, z_BxW) -> dict[str, jax.Array]:
    """mse, nmse = sum (x - xhat)^2 / sum (x - mean_batch x)^2 (= 1 - explained variance
    about the per-dimension mean), explained_variance, l0 (mean non-zeros per row)."""
    x = jnp.asarray(x_BxD, jnp.float32)
    err = jnp.sum((x - xhat_BxD) ** 2)
    dev = jnp.sum((x - x.mean(0)) ** 2)
    nmse = err / jnp.maximum(dev, 1e-30)
    return {"mse": err / x.size, "nmse": nmse, "explained_variance": 1.0 - nmse,
            "l0": jnp.mean(jnp.sum(z_BxW != 0, axis=-1).astype(jnp.float32))}


def update_fired(tokens_since_fired_W, z_BxW):
    """Counter of tokens since each latent last fired, after this batch."""
    fired = jnp.any(z_BxW != 0, axis=0)
    grown = jnp.minimum(tokens_since_fired_W + z_BxW.shape[0], COUNTER_CAP)
    return jnp.where(fired, 0, grown).astype(jnp.int32)


def sae_loss(p, x_BxD, k: int, *, tokens_since_fired_W=None, dead_tokens: int = 10**7,
             aux_k: int = 0, aux_coef: float = 1 / 32, compute_dtype=None):
    """(loss, (metrics, new counter)). loss = MSE on normalised activations (+ aux_coef *
    AuxK when aux_k > 0: the top-aux_k dead latents reconstruct the residual x - xhat,
    normalised by the residual's variance; zero when no latent is dead)."""
    xhat, z, pre = forward(p, x_BxD, k, compute_dtype)
    m = recon_metrics(x_BxD, xhat, z)
    loss = m["mse"]
    if tokens_since_fired_W is not None:
        dead_W = tokens_since_fired_W >= dead_tokens
        m["dead_fraction"] = jnp.mean(dead_W.astype(jnp.float32))
        if aux_k > 0:
            resid = jax.lax.stop_gradient(x_BxD - xhat)
            z_aux = topk(jnp.where(dead_W, pre, 0.0), min(aux_k, pre.shape[-1]))
            e_hat = _dot(z_aux, p["w_dec"], compute_dtype)
            aux = (jnp.sum((resid - e_hat) ** 2)
                   / jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-30))
            aux = jnp.where(jnp.any(dead_W), aux, 0.0)
            m["auxk_loss"] = aux
            loss = loss + aux_coef * aux
        tokens_since_fired_W = update_fired(tokens_since_fired_W, z)
    return loss, (m, tokens_since_fired_W)


# ---------------------------------------------------------------------------- sizes


def abstract_sae(cfg: SAEConfig, param_dtype=jnp.float32) -> TopKSAE:
    return nnx.eval_shape(lambda: TopKSAE(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def param_count(cfg: SAEConfig) -> int:
    """Exact: 2 * d * W + W + d (encoder, its bias, decoder, b_dec)."""
    d, W = cfg.d_input, cfg.n_latents
    return 2 * d * W + W + d


def matmul_flops_per_example(cfg: SAEConfig) -> int:
    """Forward matmul FLOPs per activation with a dense decoder: 2dW (encoder) + 2Wd."""
    return 4 * cfg.d_input * cfg.n_latents


# ---------------------------------------------------------------------------- loaded run


@partial(jax.jit, static_argnums=(2,))
def _encode_raw(p, acts, k, norm):
    return encode(p, norm.normalize(acts), k)


@jax.jit
def _decode_raw(p, z, norm):
    return norm.denormalize(decode(p, z))


@partial(jax.jit, static_argnums=(2,))
def _reconstruct_raw(p, acts, k, norm):
    return norm.denormalize(forward(p, norm.normalize(acts), k)[0])


@dataclass
class LoadedSAE:
    """A trained SAE with its normaliser; a `Reconstructor` (glp_jax.evals.recon).

    Inputs and outputs are raw activations (float32 numpy). Rows are processed in chunks of
    `chunk` rows (the last one zero-padded; a call with fewer rows uses the next power of
    two), so one compiled shape serves every large call and memory stays bounded."""

    params: dict[str, jax.Array]
    normalizer: Any  # glp_jax.model.Normalizer
    config: SAEConfig
    source: str
    step: int | None = None
    chunk: int = 4096
    name: str = "sae"

    @property
    def k(self) -> int:
        return self.config.k

    def _chunks(self, rows: np.ndarray, fn, width: int) -> np.ndarray:
        return map_rows(lambda part, _i: fn(jnp.asarray(part)), rows, width, self.chunk)

    def encode(self, acts_NxD) -> np.ndarray:
        """Latents [N, width] (dense, exactly k non-zeros per row)."""
        return self._chunks(acts_NxD, lambda a: _encode_raw(self.params, a, self.k,
                                                            self.normalizer),
                            self.config.n_latents)

    def decode(self, latents_NxW) -> np.ndarray:
        return self._chunks(latents_NxW, lambda z: _decode_raw(self.params, z, self.normalizer),
                            self.config.d_input)

    def reconstruct(self, acts_NxD) -> np.ndarray:
        """decode(encode(acts)) in raw space, never holding [N, width] at once."""
        return self._chunks(acts_NxD, lambda a: _reconstruct_raw(self.params, a, self.k,
                                                                 self.normalizer),
                            self.config.d_input)

    __call__ = reconstruct

    def describe(self) -> dict:
        return {"method": self.name, "source": self.source, "step": self.step,
                "d_input": self.config.d_input, "width": self.config.n_latents, "n_latents": self.config.n_latents, "k": self.k,
                "params": param_count(self.config)}
