"""The GLP denoiser (GLP_SPEC.md section 2) in Flax NNX, and the activation Normalizer.

Parameter tree (mirrors the original's module names so checkpoint conversion is a table):
    in_proj, out_proj                      Linear: kernel [in, out], bias [out]
    time_embed.{fc1,fc2}                   Linear(D, D) - SiLU - Linear(D, D)
    layer_embed.{fc1,fc2}                  same, multi-layer models only (else None)
    ln                                     final LayerNorm: scale [D], bias [D]
    blocks.{ln,gate_proj,time_proj,up_proj,down_proj}
                                           every leaf with a leading [n_layers] axis
Kernels are [in, out]; torch Linear weights are [out, in] (see interop/original_ckpt.py).

The blocks are stacked and run with `jax.lax.scan`, so compile time does not grow with
depth. Initialisation is PyTorch's default (what the original trained from): every Linear
weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), LayerNorm scale 1 and bias 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax.errors import ConfigError

LN_EPS = 1e-5
MAX_PERIOD = 10000.0
# The network's time input is the diffusers timestep 1000 * sigma, not sigma.
NUM_TRAIN_TIMESTEPS = 1000.0

# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GLPConfig:
    """Denoiser shape. Keys keep the original's `denoiser_config` names.

    d_model defaults to 2 * d_input and d_mlp to 4 * d_input (the released models).
    multi_layer_n_layers: number of LLM layers of a multi-layer model (enables the layer
    embedding); None for a single-layer model.
    """

    d_input: int
    n_layers: int
    d_model: int | None = None
    d_mlp: int | None = None
    multi_layer_n_layers: int | None = None

    def __post_init__(self):
        for key in ("d_input", "n_layers", "d_model", "d_mlp", "multi_layer_n_layers"):
            v = getattr(self, key)
            if v is None and key not in ("d_input", "n_layers"):
                continue
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ConfigError(f"GLPConfig.{key}={v!r}: must be a positive integer")
            object.__setattr__(self, key, int(v))  # plain ints: hashable, YAML-safe
        if self.multi_layer_n_layers is not None and self.multi_layer_n_layers < 2:
            raise ConfigError(
                f"GLPConfig.multi_layer_n_layers={self.multi_layer_n_layers}: the layer "
                "embedding divides by (n - 1); use None for a single-layer model or n >= 2")

    @property
    def width(self) -> int:
        """D = d_model, the residual width."""
        return int(self.d_model) if self.d_model is not None else 2 * int(self.d_input)

    @property
    def mlp_width(self) -> int:
        """H = d_mlp, the number of meta-neurons per block."""
        return int(self.d_mlp) if self.d_mlp is not None else 4 * int(self.d_input)

    @property
    def is_multi_layer(self) -> bool:
        return self.multi_layer_n_layers is not None

    def resolved(self) -> GLPConfig:
        """The same config with d_model and d_mlp filled in."""
        return dataclasses.replace(self, d_model=self.width, d_mlp=self.mlp_width)

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self.resolved())

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> GLPConfig:
        """Build from a `denoiser_config`-style mapping; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ConfigError(f"unknown GLPConfig keys {unknown}; valid keys: {sorted(names)}")
        missing = [k for k in ("d_input", "n_layers") if obj.get(k) is None]
        if missing:
            raise ConfigError(f"GLPConfig needs {missing} (got {dict(obj)})")
        return cls(**{k: _as_int_or_none(k, v) for k, v in obj.items()})


def _as_int_or_none(key: str, v: Any) -> int | None:
    """Accept ints and the strings a CLI/YAML gives ("12", "null", "none")."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "~", "")):
        return None
    if isinstance(v, bool):
        raise ConfigError(f"{key}={v!r}: expected an integer")
    if isinstance(v, int | np.integer):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={v!r}: expected an integer or null") from None
    if not f.is_integer():
        raise ConfigError(f"{key}={v!r}: expected an integer")
    return int(f)


# Released configurations (GLP_SPEC.md table) and the SmolLM2-135M widths used here.
PRESETS: dict[str, GLPConfig] = {
    **{f"glp-llama1b-d{n}": GLPConfig(2048, n) for n in (3, 6, 12, 24)},
    "glp-llama1b-d12-multi": GLPConfig(2048, 12, multi_layer_n_layers=16),
    "glp-llama8b-d6": GLPConfig(4096, 6),
    **{f"smollm2-d{n}": GLPConfig(576, n) for n in (3, 6, 12, 24)},
}

# ---------------------------------------------------------------------------- layers


def _torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """PyTorch's nn.Linear default: weight and bias ~ U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel [*stack, in, out]; `stack` adds leading axes."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, stack: tuple[int, ...] = (),
                 param_dtype=jnp.float32):
        self.kernel = nnx.Param(_torch_uniform(rngs.params(), (*stack, d_in, d_out), d_in,
                                               param_dtype))
        self.bias = nnx.Param(_torch_uniform(rngs.params(), (*stack, d_out), d_in, param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {"kernel": self.kernel[...], "bias": self.bias[...]}


class LayerNorm(nnx.Module):
    """Affine LayerNorm parameters (scale 1, bias 0), statistics computed in fp32."""

    def __init__(self, d: int, *, stack: tuple[int, ...] = (), param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((*stack, d), param_dtype))
        self.bias = nnx.Param(jnp.zeros((*stack, d), param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {"scale": self.scale[...], "bias": self.bias[...]}


class EmbedMLP(nnx.Module):
    """Linear(D, D) - SiLU - Linear(D, D): the original's Sequential indices 0 and 2."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.fc1 = Linear(d, d, rngs=rngs, param_dtype=param_dtype)
        self.fc2 = Linear(d, d, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, emb_BxD: jax.Array, dtype) -> jax.Array:
        h = jax.nn.silu(dense(emb_BxD, self.fc1.arrays(), dtype))
        return dense(h, self.fc2.arrays(), dtype).astype(jnp.float32)


def dense(x: jax.Array, p: dict[str, jax.Array], dtype) -> jax.Array:
    """x @ kernel + bias with operands cast to the compute dtype (params stay as stored)."""
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """LayerNorm over the last axis in fp32 (eps 1e-5, population variance), fp32 out."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(var + LN_EPS)
    return y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def timestep_embedding(t_B: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [B, dim] in fp32: concat(cos(t f), sin(t f)), cos first.

    f_k = exp(-ln(10000) k / half), k < half = dim // 2; an odd dim gets a zero column.
    The frequencies are computed in float64 on the host and rounded to fp32 once, so every
    backend uses identical values (a device exp may differ by an ulp, and t reaches 1000).
    """
    half = dim // 2
    freqs = np.exp(-math.log(MAX_PERIOD) * np.arange(half, dtype=np.float64) / half)
    args_BxH = jnp.asarray(t_B, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
    emb = jnp.concatenate([jnp.cos(args_BxH), jnp.sin(args_BxH)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Blocks(nnx.Module):
    """n_layers SwiGLU blocks, every parameter stacked along a leading [n_layers] axis."""

    def __init__(self, cfg: GLPConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        L, D, H = cfg.n_layers, cfg.width, cfg.mlp_width
        kw = dict(rngs=rngs, stack=(L,), param_dtype=param_dtype)
        self.ln = LayerNorm(D, stack=(L,), param_dtype=param_dtype)
        self.gate_proj = Linear(D, H, **kw)
        self.time_proj = Linear(D, H, **kw)
        self.up_proj = Linear(D, H, **kw)
        self.down_proj = Linear(H, D, **kw)

    def __call__(self, h_BxD: jax.Array, e_BxD: jax.Array, dtype, return_meta: bool,
                 remat: bool = False, unroll: int = 1):
        """Residual stream h (fp32) through all blocks; also every block's `a` if asked.

        remat=True recomputes each block in the backward pass instead of storing its
        activations (jax.checkpoint): ~1/3 more FLOPs, activation memory of one block.
        unroll: blocks per scan iteration (0 = all). Unrolled blocks index their weights
        statically, so XLA drops the per-iteration weight slices and gradient update-slices
        (5% of a d3 step on CPU, BENCHMARKS.md); the compile grows with it."""
        params = {"ln": self.ln.arrays(), "gate": self.gate_proj.arrays(),
                  "time": self.time_proj.arrays(), "up": self.up_proj.arrays(),
                  "down": self.down_proj.arrays()}
        e_c = e_BxD.astype(dtype)

        def block(h, p):
            y = layer_norm(h, p["ln"]).astype(dtype)
            m_BxH = dense(y, p["gate"], dtype) * dense(e_c, p["time"], dtype)
            a_BxH = jax.nn.silu(m_BxH) * dense(y, p["up"], dtype)  # the meta-neurons
            h = h + dense(a_BxH, p["down"], dtype).astype(jnp.float32)
            return h, (a_BxH.astype(jnp.float32) if return_meta else None)

        return jax.lax.scan(jax.checkpoint(block) if remat else block, h_BxD, params,
                            unroll=unroll or self.ln.scale.shape[0])


class GLP(nnx.Module):
    """The denoiser: predicts the flow velocity eps - x from (z, sigma[, layer])."""

    def __init__(self, cfg: GLPConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg.resolved()
        d, D = cfg.d_input, cfg.width
        self.time_embed = EmbedMLP(D, rngs=rngs, param_dtype=param_dtype)
        self.layer_embed = (EmbedMLP(D, rngs=rngs, param_dtype=param_dtype)
                            if cfg.is_multi_layer else None)
        self.in_proj = Linear(d, D, rngs=rngs, param_dtype=param_dtype)
        self.blocks = Blocks(cfg, rngs=rngs, param_dtype=param_dtype)
        self.ln = LayerNorm(D, param_dtype=param_dtype)
        self.out_proj = Linear(D, d, rngs=rngs, param_dtype=param_dtype)

    def embed(self, sigma_B: jax.Array, layer_idx_B: jax.Array | None, dtype) -> jax.Array:
        """The conditioning vector e [B, D] in fp32 (time MLP [+ layer MLP])."""
        D = self.cfg.width
        e = self.time_embed(timestep_embedding(NUM_TRAIN_TIMESTEPS * sigma_B, D), dtype)
        if self.layer_embed is not None:
            if layer_idx_B is None:
                raise ValueError(
                    "this is a multi-layer GLP (multi_layer_n_layers="
                    f"{self.cfg.multi_layer_n_layers}): pass layer_idx_B, the LLM layer of "
                    "each row")
            depth_B = (jnp.broadcast_to(jnp.asarray(layer_idx_B), sigma_B.shape)
                       .astype(jnp.float32) / (self.cfg.multi_layer_n_layers - 1))
            e = e + self.layer_embed(timestep_embedding(depth_B, D), dtype)
        return e

    def __call__(self, x_BxD: jax.Array, sigma_B: jax.Array, layer_idx_B: jax.Array | None = None,
                 *, return_meta: bool = False, compute_dtype=None, remat: bool = False,
                 unroll: int = 1):
        """Velocity v [B, d_input] in fp32 for noisy inputs z = x_BxD at noise level sigma_B.

        sigma_B: [B] or a scalar (broadcast). layer_idx_B: LLM layer per row (multi-layer
        models; ignored by single-layer ones, as in the original). compute_dtype (e.g.
        jnp.bfloat16) is the matmul dtype; params keep their dtype, LayerNorm statistics,
        embeddings, the residual stream and the output stay fp32. None means fp32.
        return_meta=True also returns a_LxBxH (fp32), every block's meta-neurons.
        """
        dtype = jnp.dtype(compute_dtype or jnp.float32)
        B = x_BxD.shape[0]
        sigma_B = jnp.broadcast_to(jnp.asarray(sigma_B, jnp.float32), (B,))
        e_BxD = self.embed(sigma_B, layer_idx_B, dtype)
        h_BxD = dense(x_BxD, self.in_proj.arrays(), dtype).astype(jnp.float32)
        h_BxD, a_LxBxH = self.blocks(h_BxD, e_BxD, dtype, return_meta, remat, unroll)
        y = layer_norm(h_BxD, self.ln.arrays()).astype(dtype)
        v_BxD = dense(y, self.out_proj.arrays(), dtype).astype(jnp.float32)
        return (v_BxD, a_LxBxH) if return_meta else v_BxD


# ---------------------------------------------------------------------------- sizes


GLP_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(GLPConfig))


def abstract_glp(cfg: GLPConfig, param_dtype=jnp.float32) -> GLP:
    """A GLP whose params are ShapeDtypeStructs: shapes without allocating anything."""
    return nnx.eval_shape(lambda: GLP(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def param_count(cfg: GLPConfig) -> int:
    """Number of parameters, from `jax.eval_shape` (no allocation)."""
    state = nnx.state(abstract_glp(cfg), nnx.Param)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


def matmul_flops_per_example(cfg: GLPConfig) -> int:
    """Exact forward matmul FLOPs per activation: 2 * in * out over every Linear.

    Includes the time (and layer) embedding MLPs, which run once per example since every
    example has its own sigma. Bias adds, norms and elementwise ops are not counted.
    A training step costs 3x this (forward + two backward matmuls per Linear).
    """
    d, D, H, L = cfg.d_input, cfg.width, cfg.mlp_width, cfg.n_layers
    n_embed_mlps = 2 if cfg.is_multi_layer else 1
    flops = 2 * (d * D + D * d)                 # in_proj, out_proj
    flops += n_embed_mlps * 2 * (2 * D * D)     # Linear(D,D) x 2 per embedding MLP
    flops += L * 2 * (3 * D * H + H * D)        # gate, time, up, down per block
    return int(flops)


def model_info(overrides: dict[str, Any]) -> dict[str, Any]:
    """Size and compute of a GLP configuration, for `glp model info key=value ...`.

    Keys: `preset` (one of PRESETS) and/or the GLPConfig keys, values as ints or strings.
    """
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[preset].to_dict()
        if "d_input" in overrides and "d_model" not in overrides:
            base["d_model"] = base["d_mlp"] = None  # re-derive widths from the new d_input
    else:
        base = {}
        if "d_input" not in overrides or "n_layers" not in overrides:
            raise ConfigError("give preset=NAME or d_input=... n_layers=... "
                              f"(presets: {', '.join(sorted(PRESETS))})")
    cfg = GLPConfig.from_dict({**base, **overrides}).resolved()
    n = param_count(cfg)
    fwd = matmul_flops_per_example(cfg)
    return {
        "preset": preset,
        **cfg.to_dict(),
        "params": n,
        "fwd_matmul_flops_per_activation": fwd,
        "train_flops_per_activation_6N": 6 * n,
        "train_flops_per_activation_matmul": 3 * fwd,
    }


# ---------------------------------------------------------------------------- normalizer


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Normalizer:
    """Per-dimension z-score of LLM activations (a pytree, usable inside jit).

    mean/var/std are fp32 of shape [d], or [L, d] for multi-layer statistics indexed by
    layer *position* (row of the statistics). var is floored at
    max(rel_floor * mean(var over d), abs_floor) per row, so dead dimensions cannot
    divide by zero (the original used no floor); std = sqrt(var) computed in float64.
    """

    mean: jax.Array
    var: jax.Array
    std: jax.Array

    @staticmethod
    def from_moments(mean, var, *, rel_floor: float = 1e-8, abs_floor: float = 1e-12
                     ) -> Normalizer:
        mean64 = np.asarray(mean, dtype=np.float64)
        var64 = np.asarray(var, dtype=np.float64)
        if mean64.shape != var64.shape or mean64.ndim not in (1, 2) or mean64.shape[-1] == 0:
            raise ValueError(f"mean {mean64.shape} and var {var64.shape} must both be [d] or "
                             "[L, d]")
        if not (np.isfinite(mean64).all() and np.isfinite(var64).all()):
            raise ValueError("statistics contain NaN or Inf; recompute them from finite data")
        floor = np.maximum(rel_floor * np.abs(var64).mean(axis=-1, keepdims=True), abs_floor)
        var64 = np.maximum(var64, floor)
        return Normalizer(mean=jnp.asarray(mean64, jnp.float32),
                          var=jnp.asarray(var64, jnp.float32),
                          std=jnp.asarray(np.sqrt(var64), jnp.float32))

    @property
    def d(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def n_layers(self) -> int | None:
        """Rows of multi-layer statistics; None for [d] statistics."""
        return int(self.mean.shape[0]) if self.mean.ndim == 2 else None

    def _rows(self, stat: jax.Array, layer_pos) -> jax.Array:
        if stat.ndim == 1:
            return stat
        if layer_pos is None:
            if stat.shape[0] == 1:
                return stat[0]
            raise ValueError(f"statistics are per layer {tuple(stat.shape)}: pass layer_pos "
                             "(row of the statistics, int or [B])")
        pos = jnp.asarray(layer_pos)
        return stat[pos] if pos.ndim == 0 else stat[pos, :]

    def normalize(self, x_BxD: jax.Array, layer_pos=None) -> jax.Array:
        return (jnp.asarray(x_BxD, jnp.float32) - self._rows(self.mean, layer_pos)) \
            / self._rows(self.std, layer_pos)

    def denormalize(self, x_BxD: jax.Array, layer_pos=None) -> jax.Array:
        return jnp.asarray(x_BxD, jnp.float32) * self._rows(self.std, layer_pos) \
            + self._rows(self.mean, layer_pos)
