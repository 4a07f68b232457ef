"""`glp_jax.load(run_dir)`: a trained GLP ready to sample, project and encode, or (for a
run trained with model=sae) a `LoadedSAE` (glp_jax/sae.py) that encodes, decodes and
reconstructs.

Accepts our run directories (orbax checkpoints) and folders in the original release's
layout (`config.yaml`, `rep_statistics.pt`, `final.safetensors`), so the public
checkpoints load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glp_jax import flow
from glp_jax.errors import CheckpointCorruptError, CheckpointError, warn
from glp_jax.layers import layer_position
from glp_jax.model import GLP, GLPConfig, Normalizer, abstract_glp
from glp_jax.sae import LoadedSAE, SAEConfig, abstract_sae


@dataclass
class LoadedGLP:
    """A denoiser with its normaliser. Inputs and outputs are raw (denormalised) activations."""

    model: GLP
    normalizer: Normalizer
    config: GLPConfig
    layers: list[int]  # LLM layers the model was trained on
    source: str
    step: int | None = None

    def layer_args(self, layer: int | None, n: int):
        """(layer position in the statistics, LLM layer ids for the model) for `layer`."""
        if len(self.layers) <= 1 and not self.config.is_multi_layer:
            return None, None
        if layer is None:
            raise ValueError(f"multi-layer GLP (layers {self.layers}): pass layer=")
        return layer_position(self.layers, layer), jnp.full((n,), layer, jnp.int32)

    def _apply(self, layer_ids, with_meta=False):
        model = self.model

        def apply_fn(z, sigma_B):
            return model(z, sigma_B, layer_ids, return_meta=with_meta)

        return apply_fn

    def sample(self, n: int, steps: int = 20, seed: int = 0, layer: int | None = None) -> np.ndarray:
        pos, ids = self.layer_args(layer, n)
        z = _sample(self.model, jax.random.key(seed), n, self.config.d_input, steps, ids)
        return np.asarray(self.normalizer.denormalize(z, pos))

    def project(self, acts_BxD, seed: int = 0, layer: int | None = None,
                convention: str = "code", sigma0: float = 0.5, steps: int = 20) -> np.ndarray:
        """On-manifold projection of (e.g. steered) activations."""
        acts = jnp.asarray(acts_BxD, jnp.float32)
        pos, ids = self.layer_args(layer, acts.shape[0])
        x = self.normalizer.normalize(acts, pos)
        out = _project(self.model, x, jax.random.key(seed), ids, convention, sigma0, steps)
        return np.asarray(self.normalizer.denormalize(out, pos))

    def encode(self, acts_BxD, sigma: float = 0.1, seed: int = 0,
               layer: int | None = None) -> np.ndarray:
        """Meta-neuron features [B, n_layers * d_mlp] at noise level sigma."""
        acts = jnp.asarray(acts_BxD, jnp.float32)
        pos, ids = self.layer_args(layer, acts.shape[0])
        x = self.normalizer.normalize(acts, pos)
        return np.asarray(_encode(self.model, x, jax.random.key(seed), ids, sigma))


@partial(nnx.jit, static_argnums=(2, 3, 4))
def _sample(model, key, n, d, steps, ids):
    return flow.sample(lambda z, s: model(z, s, ids), key, (n, d), steps)


@partial(nnx.jit, static_argnums=(4, 5, 6))
def _project(model, x, key, ids, convention, sigma0, steps):
    return flow.project_on_manifold(lambda z, s: model(z, s, ids), x, key, convention, sigma0, steps)


@nnx.jit
def _encode(model, x, key, ids, sigma):
    return flow.meta_neurons(lambda z, s: model(z, s, ids, return_meta=True), x, key, sigma)


def load(run_dir: str | Path, step: int | str = "latest") -> LoadedGLP | LoadedSAE:
    """Load a run (ours or the original release's layout; an SAE run gives a LoadedSAE). step: int, 'latest', or
    'epoch_N' (our log-spaced epoch checkpoints; original: checkpoints/epoch_N)."""
    from glp_jax.checkpoint import run_path

    run_dir = run_path(run_dir)
    if (run_dir / "config.yaml").exists() and not (run_dir / "run.json").exists():
        from glp_jax.interop.original_ckpt import load_original

        name = "final" if step == "latest" else str(step)
        if name.startswith("epoch_"):
            name = f"checkpoints/{name}"
        cfg, model, normalizer = load_original(run_dir, checkpoint=name)
        layers = list(range(cfg.multi_layer_n_layers)) if cfg.is_multi_layer else []
        return LoadedGLP(model, normalizer, cfg, layers, str(run_dir), None)
    return _load_ours(run_dir, step)


def _restore_module(run, run_dir, abstract_module, step):
    """(module with the checkpoint's parameters, step) of one of our runs. 'latest' takes the
    newest intact step (a corrupt newer one is skipped with a warning); an explicit step is
    restored exactly or raises."""
    from glp_jax.checkpoint import RunCheckpoints, abstract_with_shardings
    from glp_jax.sharding import make_mesh, tree_shardings

    ckpt = RunCheckpoints(run_dir, async_save=False, keep_last_n=10**9)
    try:
        step_n = run.step_of(step)
        candidates = [step_n] if step_n is not None else sorted(ckpt.all_steps(), reverse=True)
        if not candidates:
            raise CheckpointError(f"{run_dir} has no complete checkpoint yet")
        mesh = make_mesh(-1, 1)
        with jax.set_mesh(mesh):
            graphdef, abs_params = nnx.split(abstract_module)
            target = abstract_with_shardings(abs_params, tree_shardings(abs_params, mesh))
            if step_n is not None:
                params = ckpt.restore_params(step_n, target)
            else:
                params, step_n, corrupt = _restore_newest(ckpt, target, candidates, run_dir)
                for e in corrupt:
                    warn(f"checkpoint step {e.step} of {run_dir} is corrupt ({e.reason}); "
                         f"using step {step_n}")
    finally:
        ckpt.close()
    return nnx.merge(graphdef, params), step_n


def _restore_newest(ckpt, target, steps, run_dir):
    """(params, step, the corrupt steps skipped) of the newest step that restores."""
    corrupt = []
    for s in steps:
        try:
            return ckpt.restore_params(s, target, suggest=False), s, corrupt
        except CheckpointCorruptError as e:
            corrupt.append(e)
    raise CheckpointError(f"no intact checkpoint in {run_dir}: tried " + "; ".join(
        f"step {e.step} ({e.reason})" for e in corrupt))


def _load_ours(run_dir: Path, step) -> LoadedGLP | LoadedSAE:
    from glp_jax.rundir import RunDir

    run = RunDir(run_dir)
    if not run.started():
        raise CheckpointError(f"{run_dir} is not a training run (no run.json) nor an original-"
                              f"format folder (no config.yaml)")
    resolved = run.resolved()
    normalizer = run.normalizer()
    if resolved.get("model") == "sae" or "sae" in resolved:
        sae_cfg = SAEConfig.from_dict(resolved["sae"]).resolved()
        model, step_n = _restore_module(run, run_dir, abstract_sae(sae_cfg), step)
        return LoadedSAE(model.arrays(), normalizer, sae_cfg, str(run_dir), step_n)
    glp_cfg = GLPConfig.from_dict(resolved["glp"]).resolved()
    model, step_n = _restore_module(run, run_dir, abstract_glp(glp_cfg), step)
    return LoadedGLP(model, normalizer, glp_cfg, list(resolved.get("layers", [])), str(run_dir), step_n)
