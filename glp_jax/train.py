"""Training loop: optax AdamW, sharded jit step, orbax checkpoints, for the GLP
(flow-matching loss) and its TopK SAE baseline (glp_jax/sae.py) alike.

What differs between the two models is a `ModelSpec` (GLPSpec, SAESpec): the module, its
loss with auxiliary metrics, optional extra training state (the SAE's dead-latent
counter), a post-update hook (the SAE's decoder renormalisation), the validation metrics,
size and FLOPs, and the run.json key. `train()` is one loop for both.

The step is a pure function of (params, optimizer state, global batch, step): the noise
and sigma keys are `fold_in(seed key, step)`, so a run resumed from a checkpoint (params,
optimizer state, data-iterator state) reproduces the uninterrupted loss trajectory, and
1 device and N devices draw the same numbers (partitionable threefry).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glp_jax import flow, sae
from glp_jax.checkpoint import RunCheckpoints, abstract_with_shardings
from glp_jax.config import TrainConfig
from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError, GLPError
from glp_jax.layers import layer_position
from glp_jax.lock import WriterLock
from glp_jax.model import (
    GLP,
    GLPConfig,
    Normalizer,
    abstract_glp,
    matmul_flops_per_example,
    param_count,
)
from glp_jax.preempt import PreemptionGuard
from glp_jax.progress import progress_bar
from glp_jax.rundir import RunDir, epoch_step, jsonable, write_atomic
from glp_jax.sae import SAEConfig, TopKSAE
from glp_jax.sharding import batch_sharding, global_batch, make_mesh, replicated, tree_shardings
from glp_jax.tracking import open_trackers, require_trackers

if TYPE_CHECKING:
    from glp_jax.data.pipeline import Pipeline


class TrainingDivergedError(GLPError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- schedule
def lr_factor(step, total_steps: int, warmup_ratio: float = 0.01, initial: float = 0.01,
              final: float = 0.1):
    """The original warmup-cosine factor (GLP_SPEC.md section 4); jnp-traceable."""
    warm = warmup_ratio * total_steps
    s = jnp.asarray(step, jnp.float32)
    warmup = initial + (1.0 - initial) * s / jnp.maximum(warm, 1e-9)
    frac = (s - warm) / jnp.maximum(total_steps - warm, 1e-9)
    cosine = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(s < warm, warmup, jnp.where(s >= total_steps, final, cosine))


def make_optimizer(cfg: TrainConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    def schedule(step):
        return cfg.learning_rate * lr_factor(step, total_steps, cfg.warmup_ratio,
                                             cfg.initial_factor, cfg.final_factor)

    parts = []
    if cfg.gradient_clipping_threshold and cfg.gradient_clipping_threshold > 0:
        parts.append(optax.clip_by_global_norm(cfg.gradient_clipping_threshold))
    parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- the step
def loss_fn(params, graphdef, x_BxD, layer_B, key, *, compute_dtype, discrete: bool,
            remat: bool = False, unroll: int = 1):
    model = nnx.merge(graphdef, params)
    k_sigma, k_eps = jax.random.split(key)
    sigma_B = flow.sample_train_sigma(k_sigma, x_BxD.shape[0], discrete=discrete)
    eps_BxD = jax.random.normal(k_eps, x_BxD.shape, jnp.float32)
    z_BxD = flow.add_noise(x_BxD, eps_BxD, sigma_B)
    v_BxD = model(z_BxD, sigma_B, layer_B, compute_dtype=compute_dtype, remat=remat,
                  unroll=unroll)
    return flow.flow_loss(v_BxD, flow.velocity_target(x_BxD, eps_BxD))


def make_step(loss, tx, *, accum: int, post_update: Callable | None = None):
    """The generic step of any model.

    loss(params, x, layer, key, stats) -> (scalar, (aux metrics dict, new stats)); stats is
    extra training state (None for the GLP). Returns the pure step
    (params, opt_state, stats, x, layer, step, base_key)
        -> (params, opt_state, stats, loss, grad_norm, aux).
    """
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def step_fn(params, opt_state, stats, x_BxD, layer_B, step, base_key):
        key = jax.random.fold_in(base_key, step)
        if accum == 1:
            (loss_v, (aux, stats)), grads = grad_fn(params, x_BxD, layer_B, key, stats)
        else:
            # Micro-batch a = rows a, a+A, a+2A, ...: every device keeps its own rows.
            B = x_BxD.shape[0]
            xs = jnp.swapaxes(x_BxD.reshape(B // accum, accum, -1), 0, 1)
            ls = None if layer_B is None else jnp.swapaxes(layer_B.reshape(B // accum, accum), 0, 1)
            keys = jax.random.split(key, accum)

            def micro(carry, inp):
                acc, st = carry
                xi, li, ki = inp
                (loss_i, (aux_i, st)), g = grad_fn(params, xi, li, ki, st)
                return (jax.tree.map(jnp.add, acc, g), st), (loss_i, aux_i)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, stats), (losses, auxs) = jax.lax.scan(micro, (zeros, stats), (xs, ls, keys))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss_v = losses.mean()
            aux = jax.tree.map(lambda a: a.mean(0), auxs)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if post_update is not None:
            params = post_update(params)
        return params, opt_state, stats, loss_v, grad_norm, aux

    return step_fn


def glp_loss(graphdef, *, compute_dtype, discrete: bool, remat: bool = False, unroll: int = 1):
    """The GLP's loss in make_step's form: no aux metrics, no extra state."""

    def loss(params, x_BxD, layer_B, key, stats):
        return loss_fn(params, graphdef, x_BxD, layer_B, key, compute_dtype=compute_dtype,
                       discrete=discrete, remat=remat, unroll=unroll), ({}, stats)

    return loss


def make_train_step(graphdef, tx, *, accum: int, compute_dtype, discrete: bool,
                    remat: bool = False, unroll: int = 1):
    """GLP: (params, opt_state, x, layer, step, base_key) -> (params, opt_state, loss, grad_norm)."""
    inner = make_step(glp_loss(graphdef, compute_dtype=compute_dtype, discrete=discrete,
                               remat=remat, unroll=unroll), tx, accum=accum)

    def step_fn(params, opt_state, x_BxD, layer_B, step, base_key):
        params, opt_state, _, loss, grad_norm, _ = inner(params, opt_state, None, x_BxD,
                                                         layer_B, step, base_key)
        return params, opt_state, loss, grad_norm

    return step_fn


def make_eval_fn(graphdef, sigmas: list[float], compute_dtype):
    """Validation loss at a fixed sigma grid with fixed noise: comparable across runs."""
    sig = jnp.asarray(sigmas, jnp.float32)

    def eval_fn(params, x_BxD, layer_B):
        model = nnx.merge(graphdef, params)
        eps = jax.random.normal(jax.random.key(12345), (len(sigmas), *x_BxD.shape), jnp.float32)

        def one(s, e):
            sigma_B = jnp.full((x_BxD.shape[0],), s)
            v = model(flow.add_noise(x_BxD, e, sigma_B), sigma_B, layer_B,
                      compute_dtype=compute_dtype)
            return flow.flow_loss(v, flow.velocity_target(x_BxD, e))

        return jax.vmap(one)(sig, eps).mean()

    return eval_fn


# ----------------------------------------------------------------------------- models
class ModelSpec:
    """What the loop needs to know about the model it trains (see GLPSpec, SAESpec)."""

    kind: str  # "glp" | "sae": the model name and its key in run.json
    config: Any  # GLPConfig | SAEConfig (to_dict() goes to run.json)

    def abstract(self) -> nnx.Module:
        """The module with ShapeDtypeStruct parameters (nothing allocated)."""
        raise NotImplementedError

    def build(self, seed: int) -> nnx.Module:
        """The initialised module (called under jit, straight into the shards)."""
        raise NotImplementedError

    def param_count(self) -> int:
        raise NotImplementedError

    def fwd_matmul_flops(self) -> int:
        """Exact forward matmul FLOPs per activation (a training step costs 3x)."""
        raise NotImplementedError

    def shape(self) -> dict:
        """Widths recorded in run.json["run"]."""
        raise NotImplementedError

    def init_stats(self):
        """Extra training state besides params and optimizer (checkpointed); None = none."""
        return None

    def loss(self, graphdef, cfg: TrainConfig) -> Callable:
        """make_step's loss: (params, x, layer, key, stats) -> (loss, (aux, stats))."""
        raise NotImplementedError

    def post_update(self, graphdef) -> Callable | None:
        return None

    def eval_fn(self, graphdef, cfg: TrainConfig) -> Callable:
        """(params, x, layer) -> {"val_loss": ..., other val_* metrics} on the fixed batch."""
        raise NotImplementedError


AUTO_UNROLL_MAX_BLOCKS = 6  # measured: d3 and d6 steps 5% faster unrolled on CPU


def scan_unroll(cfg: TrainConfig, n_layers: int) -> int:
    """Blocks per scan iteration: the config's, or all of them for shallow models."""
    if cfg.scan_unroll is not None:
        return cfg.scan_unroll
    return 0 if n_layers <= AUTO_UNROLL_MAX_BLOCKS else 1


def _compute_dtype(cfg: TrainConfig):
    return jnp.bfloat16 if cfg.use_bf16 else jnp.float32


@dataclass(frozen=True)
class GLPSpec(ModelSpec):
    config: GLPConfig
    kind: str = "glp"

    def abstract(self):
        return abstract_glp(self.config)

    def build(self, seed):
        return GLP(self.config, rngs=nnx.Rngs(seed))

    def param_count(self):
        return param_count(self.config)

    def fwd_matmul_flops(self):
        return matmul_flops_per_example(self.config)

    def shape(self):
        c = self.config
        return {"d_input": c.d_input, "d_model": c.width, "d_mlp": c.mlp_width,
                "n_layers": c.n_layers}

    def loss(self, graphdef, cfg):
        return glp_loss(graphdef, compute_dtype=_compute_dtype(cfg),
                        discrete=cfg.sigma_sampling == "discrete", remat=cfg.remat_blocks,
                        unroll=scan_unroll(cfg, self.config.n_layers))

    def eval_fn(self, graphdef, cfg):
        fn = make_eval_fn(graphdef, cfg.eval_sigmas, _compute_dtype(cfg))
        return lambda params, x, layer: {"val_loss": fn(params, x, layer)}


@dataclass(frozen=True)
class SAESpec(ModelSpec):
    """TopK SAE on normalised activations: MSE (+ optional AuxK), decoder rows renormalised
    after each update, dead latents counted in `stats` (tokens since each latent fired)."""

    config: SAEConfig
    dead_tokens: int = 10_000_000
    aux_k: int = 0
    aux_coef: float = 1 / 32
    kind: str = "sae"

    def abstract(self):
        return sae.abstract_sae(self.config)

    def build(self, seed):
        return TopKSAE(self.config, rngs=nnx.Rngs(seed))

    def param_count(self):
        return sae.param_count(self.config)

    def fwd_matmul_flops(self):
        return sae.matmul_flops_per_example(self.config)

    def shape(self):
        c = self.config
        return {"d_input": c.d_input, "width": c.n_latents, "k": c.k}

    def init_stats(self):
        return {"tokens_since_fired": jnp.zeros((self.config.n_latents,), jnp.int32)}

    def loss(self, graphdef, cfg):
        dtype, k = _compute_dtype(cfg), self.config.k

        def loss(params, x_BxD, layer_B, key, stats):
            p = nnx.merge(graphdef, params).arrays()
            value, (m, counter) = sae.sae_loss(
                p, x_BxD, k, tokens_since_fired_W=stats["tokens_since_fired"],
                dead_tokens=self.dead_tokens, aux_k=self.aux_k, aux_coef=self.aux_coef,
                compute_dtype=dtype)
            m.pop("mse")  # == loss without AuxK
            return value, (m, {"tokens_since_fired": counter})

        return loss

    def post_update(self, graphdef):
        def renorm(params):
            model = nnx.merge(graphdef, params)
            model.w_dec[...] = sae.renormalize_decoder(model.arrays())["w_dec"]
            return nnx.state(model)

        return renorm

    def eval_fn(self, graphdef, cfg):
        dtype, k = _compute_dtype(cfg), self.config.k

        def fn(params, x_BxD, layer_B):
            p = nnx.merge(graphdef, params).arrays()
            xhat, z, _ = sae.forward(p, x_BxD, k, dtype)
            m = sae.recon_metrics(x_BxD, xhat, z)
            # Dead on the validation batch: latents that fire on none of its rows.
            dead = jnp.mean((~jnp.any(z != 0, axis=0)).astype(jnp.float32))
            return {"val_loss": m["mse"], "val_nmse": m["nmse"],
                    "val_explained_variance": m["explained_variance"], "val_l0": m["l0"],
                    "val_dead_fraction": dead}

        return fn


def _check_d_input(cfg: TrainConfig, d: int) -> None:
    if cfg.d_input is not None and cfg.d_input != d:
        raise ConfigError(f"d_input={cfg.d_input} but the store holds d={d} activations; "
                          f"drop d_input (it defaults to the store's d) or use a matching store")


def sae_config_for(cfg: TrainConfig, d: int, n_store_layers: int = 1) -> SAEConfig:
    _check_d_input(cfg, d)
    if n_store_layers > 1:
        raise ConfigError(f"model=sae trains on one layer, but {n_store_layers} store layers "
                          f"are selected; pick one with layers=[k]")
    width = cfg.sae_width if cfg.sae_width is not None else cfg.sae_expansion * d
    return SAEConfig(d_input=d, width=width, k=cfg.sae_k).resolved()


def model_spec(cfg: TrainConfig, d: int, n_store_layers: int) -> ModelSpec:
    """The spec of cfg.model for a store of width d with n_store_layers layers."""
    if cfg.model == "sae":
        return SAESpec(sae_config_for(cfg, d, n_store_layers), dead_tokens=cfg.sae_dead_tokens,
                       aux_k=cfg.sae_aux_k, aux_coef=cfg.sae_aux_coef)
    return GLPSpec(glp_config_for(cfg, d, n_store_layers))


# ----------------------------------------------------------------------------- setup
def glp_config_for(cfg: TrainConfig, d: int, n_store_layers: int) -> GLPConfig:
    _check_d_input(cfg, d)
    multi = cfg.multi_layer_n_layers
    if n_store_layers > 1 and multi is None:
        raise ConfigError("training on several layers needs multi_layer_n_layers (the LLM's "
                          "number of decoder layers, for the layer embedding)")
    return GLPConfig(d_input=d, d_model=cfg.d_model, d_mlp=cfg.d_mlp, n_layers=cfg.n_layers,
                     multi_layer_n_layers=multi).resolved()


def normalizer_from_pipeline(pipe: Pipeline) -> Normalizer:
    """Exactly the statistics the pipeline normalises with (float64 -> fp32)."""
    mean, std = np.asarray(pipe.mean), np.asarray(pipe.std)
    if mean.shape[0] == 1:
        mean, std = mean[0], std[0]
    return Normalizer(mean=jnp.asarray(mean, jnp.float32), var=jnp.asarray(std**2, jnp.float32),
                      std=jnp.asarray(std, jnp.float32))


def init_params(spec: ModelSpec, seed: int, mesh):
    """Sharded fp32 parameters (created directly in their shards under jit)."""
    graphdef, abstract_params = nnx.split(spec.abstract())
    shardings = tree_shardings(abstract_params, mesh)

    def init():
        return nnx.split(spec.build(seed))[1]

    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, shardings


def run_info(spec: ModelSpec, n_dev: int) -> dict:
    """run.json["run"]: size, FLOPs, widths and the machine."""
    return {"params": spec.param_count(), "fwd_matmul_flops": spec.fwd_matmul_flops(),
            **spec.shape(), "devices": n_dev, "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count()}


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Train (or resume) the run in cfg.output_path. Returns the final metrics row.

    Process 0 holds the run folder's writer lock (glp_jax/lock.py) throughout: a second
    `glp train` into the same output_path is refused, naming the first.
    stop_after_steps: leave after that many steps of this call (a simulated preemption
    for tests; the checkpoint at that point is written first).
    SIGTERM/SIGINT: the current step finishes, a checkpoint is written, metrics flushed, the
    lock released, then `Preempted` is raised (`glp train` exits 75; rerun to resume).
    """
    require_trackers(cfg.trackers)  # a missing package is one line before any work
    lock = _take_run_lock(cfg.output_path)
    try:
        with PreemptionGuard() as guard, contextlib.ExitStack() as closers:
            return _train(cfg, mesh, stop_after_steps, lock, guard, closers)
    finally:
        if lock is not None:
            lock.release()


def _take_run_lock(output_path) -> WriterLock | None:
    """Process 0 checks the folder and takes its writer lock; every process learns whether
    that worked, so a refused start stops all of them (not just the first)."""
    lock, error = None, None
    if jax.process_index() == 0:
        run = RunDir(output_path)
        try:
            run.ensure_writable()
            lock = WriterLock(str(run.path), "glp train").acquire()
        except GLPError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
            raise error or GLPError(f"process 0 could not start the run in {output_path} "
                                    f"(its log says why)")
    elif error is not None:
        raise error
    return lock


def _stop_agreed(guard: PreemptionGuard, step: int, every: int) -> bool:
    """Whether every process stops after `step`. One process reads its flag; several agree
    (any of them signalled) every `every` steps, so all leave at the same step even when
    the signals reach them at different steps."""
    if jax.process_count() == 1:
        return guard.requested
    if step % every:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(guard.requested))
    if np.max(flags) and not guard.requested:
        guard.request("a signal to another process")
    return bool(np.max(flags))


def _train(cfg: TrainConfig, mesh, stop_after_steps: int | None, lock: WriterLock | None,
           guard: PreemptionGuard, closers: contextlib.ExitStack) -> dict:
    mesh = mesh or make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    total = cfg.total_steps
    n_dev = mesh.devices.size
    if cfg.batch_size % n_dev or (cfg.batch_size // cfg.gradient_accumulation_steps) % n_dev:
        raise ConfigError(f"batch_size {cfg.batch_size} (per micro-batch "
                          f"{cfg.batch_size // cfg.gradient_accumulation_steps}) must be divisible "
                          f"by the {n_dev} devices")
    from glp_jax.data.pipeline import build_pipeline  # grain: only when training

    pipe = build_pipeline(cfg.pipeline_config())
    multi = len(pipe.layers) > 1
    spec = model_spec(cfg, pipe.d, len(pipe.layers))
    normalizer = normalizer_from_pipeline(pipe)
    run = RunDir(cfg.output_path)
    run_dir = run.path
    primary = jax.process_index() == 0

    with jax.set_mesh(mesh):
        graphdef, abs_params = nnx.split(spec.abstract())
        tx, schedule = make_optimizer(cfg, total)
        abs_opt = jax.eval_shape(tx.init, abs_params)
        abs_stats = jax.eval_shape(spec.init_stats)  # None: no extra state (the GLP)
        p_shard, o_shard = tree_shardings(abs_params, mesh), tree_shardings(abs_opt, mesh)
        s_shard = tree_shardings(abs_stats, mesh)
        base_key = jax.random.key(cfg.seed)
        info = run_info(spec, n_dev)
        resolved = {**cfg.to_dict(), spec.kind: spec.config.to_dict(), "layers": pipe.layers,
                    "train_rows": pipe.rows, "run": info}
        if run.started():
            run.check_resumable(resolved)
        elif primary:
            run.write_start(cfg.to_dict(), resolved, normalizer, pipe.layers)

        epoch_steps = {epoch_step(e, cfg.epoch_size, cfg.batch_size): e
                       for e in cfg.epoch_checkpoints()}
        ckpt = RunCheckpoints(run_dir, cfg.keep_last_n, cfg.async_checkpointing,
                              keep_steps=sorted(epoch_steps), digest=cfg.checkpoint_digest)
        it = pipe.make_iterator()
        start, restored = 0, None
        if ckpt.latest_step():  # restore straight into the shards: no initialised copy alongside
            target = abstract_with_shardings(
                _ckpt_state(abs_params, abs_opt, abs_stats), _ckpt_state(p_shard, o_shard, s_shard))
            # the newest intact step; corrupt newer ones go to checkpoints_corrupt/ (warned)
            start, restored = ckpt.restore_newest_intact(target, move_aside=primary)
        if start:
            state, data_state, _ = restored
            params, opt_state = state["params"], state["opt_state"]
            stats = state.get("stats")
            it.set_state(data_state)
        else:
            params = init_params(spec, cfg.seed, mesh)[1]
            opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
            stats = (None if abs_stats is None
                     else jax.jit(spec.init_stats, out_shardings=s_shard)())
        metrics = run.metrics_log(start, primary)
        window = _restore_window(run, start, cfg.log_every_n_steps) if primary else []

        step_fn = jit_train_step(cfg, spec, graphdef, tx, p_shard, o_shard, s_shard, mesh)
        eval_fn, val = None, None
        if cfg.val_dataset:
            val = _validation_batch(cfg, pipe, normalizer, mesh)
            eval_fn = jax.jit(spec.eval_fn(graphdef, cfg))
        eval_steps = cfg.eval_steps()

        bar = progress_bar(total, "train", "step", enabled=cfg.progress and primary,
                           initial=start)
        t_window, last_row = time.perf_counter(), {}
        flops_exact_per_act = 3 * info["fwd_matmul_flops"]
        step, steps_this_call, rate_steps, preempted = start, 0, 0, False
        end = total if cfg.stop_at_step is None else min(total, cfg.stop_at_step)
        if cfg.data_mode == "single" and pipe.batches_per_epoch < total:
            raise ConfigError(
                f"num_steps {total} needs {total * cfg.batch_size:,} activations but "
                f"{cfg.train_dataset} holds {pipe.rows:,} rows x {len(pipe.layers)} layers "
                f"({pipe.batches_per_epoch} batches, single pass); lower num_steps / "
                f"num_activations, extract more rows, or set data_mode=repeat")
        trackers = closers.enter_context(open_trackers(cfg, run, resolved, start, primary))
        while step < end:
            try:
                batch = next(it)
            except StopIteration:
                bar.close()
                raise GLPError(
                    f"the data ran out after {step} steps ({pipe.rows} rows, single pass); "
                    f"lower num_steps/num_activations, extract more rows, or set data_mode=repeat"
                ) from None
            x = global_batch(np.asarray(batch["x"], np.float32), mesh)
            layer = (global_batch(np.asarray(batch["llm_layer"], np.int32), mesh)
                     if multi else None)
            params, opt_state, stats, loss, gnorm, aux = step_fn(
                params, opt_state, stats, x, layer, jnp.int32(step), base_key)
            window.append((loss, gnorm, aux))
            if steps_this_call == 0:  # exclude compilation from the throughput figures
                jax.block_until_ready(loss)
                t_window, rate_steps = time.perf_counter(), 0
            else:
                rate_steps += 1
            step += 1
            steps_this_call += 1
            bar.update(1)
            boundary_log = step % cfg.log_every_n_steps == 0 or step in eval_steps
            boundary_save = step % cfg.save_every_n_steps == 0 or step == total
            preempted = step < end and _stop_agreed(guard, step, cfg.preempt_check_every_n_steps)
            stopping = ((stop_after_steps is not None and steps_this_call >= stop_after_steps)
                        or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
                        or preempted)
            if boundary_log or boundary_save or step in epoch_steps or stopping:
                if lock is not None:
                    lock.check()  # another writer took the folder over: write nothing more
                losses = np.asarray(jax.device_get(jnp.stack([w[0] for w in window])))
                gnorms = np.asarray(jax.device_get(jnp.stack([w[1] for w in window])))
                # A finite loss with an Inf gradient still leaves NaN parameters behind.
                if not (np.isfinite(losses).all() and np.isfinite(gnorms).all()):
                    ckpt.wait()
                    bar.close()
                    good = ckpt.latest_step()
                    bad = np.concatenate([losses[~np.isfinite(losses)], gnorms[~np.isfinite(gnorms)]])
                    raise TrainingDivergedError(
                        f"loss or gradient norm became {bad[0]} by step {step}; the last "
                        f"good checkpoint (step {good}) is kept in {run_dir}/checkpoints. Lower "
                        f"learning_rate, keep gradient_clipping_threshold=1, or check the data "
                        f"for outliers (glp store info).")
            if boundary_log:
                dt = time.perf_counter() - t_window
                acts = step * cfg.batch_size
                rate = rate_steps * cfg.batch_size / dt if rate_steps else float("nan")
                row = {"step": step, "activations_seen": acts, "loss": float(losses.mean()),
                       "lr": float(schedule(step - 1)), "grad_norm": float(gnorms.mean()),
                       "activations_per_s": rate, "params": info["params"],
                       "compute_6nd": 6.0 * info["params"] * acts,
                       "flops_exact": float(flops_exact_per_act) * acts,
                       "flops_per_s": rate * flops_exact_per_act,
                       "wall_time": time.time(), "devices": n_dev,
                       "device_kind": info["device_kind"]}
                if cfg.peak_flops:
                    row["mfu"] = rate * flops_exact_per_act / (cfg.peak_flops * n_dev)
                auxs = jax.device_get([w[2] for w in window])  # model metrics: window means
                for k in auxs[0]:
                    row[k] = float(np.mean([a[k] for a in auxs]))
                if eval_fn is not None and step in eval_steps:
                    row.update({k: float(v) for k, v in eval_fn(params, *val).items()})
                metrics.write(row)
                trackers.log(row)
                last_row = row
                bar.set_postfix(loss=f"{row['loss']:.4f}", act_s=f"{rate:,.0f}")
                window, t_window, rate_steps = [], time.perf_counter(), 0
            if boundary_save or stopping or step in epoch_steps:
                if primary:  # a save inside a log window: keep the window for the resume
                    _save_window(run, step, window)
                metrics.flush()  # rows up to this checkpoint are durable (buckets buffer)
                ckpt.save(step, _ckpt_state(params, opt_state, stats), _data_state(it),
                          resolved, epoch=epoch_steps.get(step), force=True)
            if stopping:
                break
        bar.close()
        metrics.flush()
        ckpt.wait()
        ckpt.close()
        _close(it)
        trackers.close(preempted)
    if preempted:
        raise guard.stop(f"after step {step} of {total}",
                         f"checkpoint {step} is in {run_dir}/checkpoints")
    return last_row


WINDOW_FILE = "train_window.json"
WINDOWS_KEPT = 16  # async saves may still be in flight, a corrupt newest step falls back


def _save_window(run: RunDir, step: int, window: list) -> None:
    """The per-step losses since the last metrics row, kept for each recent checkpoint taken
    between log steps, so a run resumed from it logs the same window means as an
    uninterrupted one (metrics.jsonl rows average the steps since the previous row)."""
    if not window:
        return
    losses, gnorms, auxs = jax.device_get(([w[0] for w in window], [w[1] for w in window],
                                           [w[2] for w in window]))
    kept = {k: v for k, v in _read_windows(run).items() if int(k) < step}
    kept[str(step)] = {"loss": [float(v) for v in losses],
                       "grad_norm": [float(v) for v in gnorms],
                       "aux": [{k: float(v) for k, v in a.items()} for a in auxs]}
    newest = sorted(kept, key=int)[-WINDOWS_KEPT:]
    write_atomic(run / WINDOW_FILE, json.dumps({"windows": {k: kept[k] for k in newest}}))


def _read_windows(run: RunDir) -> dict:
    path = run / WINDOW_FILE
    return json.loads(path.read_text()).get("windows", {}) if path.exists() else {}


def _restore_window(run: RunDir, start: int, log_every: int) -> list:
    """The window of checkpoint `start`: its last start % log_every steps (none at a log
    step, or when the window was not kept)."""
    n = start % log_every
    saved = _read_windows(run).get(str(start)) if n else None
    if saved is None or len(saved["loss"]) < n:
        return []
    rows = zip(saved["loss"][-n:], saved["grad_norm"][-n:], saved["aux"][-n:], strict=True)
    return [(np.float32(lo), np.float32(g), {k: np.float32(v) for k, v in a.items()})
            for lo, g, a in rows]


def _ckpt_state(params, opt_state, stats) -> dict:
    """The checkpointed training state; "stats" only for models that keep extra state."""
    state = {"params": params, "opt_state": opt_state}
    if stats is not None:
        state["stats"] = stats
    return state


def _data_state(it) -> dict:
    state = it.get_state()
    return json.loads(json.dumps(state, default=jsonable))


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close:
        close()


def _validation_batch(cfg: TrainConfig, pipe: Pipeline, normalizer: Normalizer, mesh):
    """The first eval_rows rows of the validation store per layer, normalised (fixed)."""
    val = ActivationStore.open(cfg.val_dataset)
    if val.d != pipe.d or val.meta.model != pipe.stores[0].meta.model:
        raise ConfigError(f"val_dataset {cfg.val_dataset} (model {val.meta.model}, d={val.d}) does "
                          f"not match train_dataset (model {pipe.stores[0].meta.model}, d={pipe.d})")
    per_layer = max(1, cfg.eval_rows // len(pipe.layers))
    n = min(per_layer, len(val))
    n -= n % mesh.devices.size
    if n <= 0:
        raise ConfigError(f"val_dataset {cfg.val_dataset} has too few rows ({len(val)})")
    # A fixed random subset (not the first rows: they would come from a handful of documents).
    idx = np.sort(np.random.default_rng(0).choice(len(val), n, replace=False))
    xs, ls = [], []
    for k in pipe.layers:
        x = val.read_rows(idx, layer=k)
        xs.append(np.asarray(normalizer.normalize(x, layer_position(pipe.layers, k))))
        ls.append(np.full(n, k, np.int32))
    x = jax.device_put(np.concatenate(xs), batch_sharding(mesh))
    layer = (jax.device_put(np.concatenate(ls), batch_sharding(mesh, ndim=1))
             if len(pipe.layers) > 1 else None)
    return x, layer


def jit_train_step(cfg: TrainConfig, spec: ModelSpec, graphdef, tx, p_shard, o_shard,
                   s_shard, mesh):
    """The jitted step with the run's settings, output shardings and buffer donation."""
    step = make_step(spec.loss(graphdef, cfg), tx, accum=cfg.gradient_accumulation_steps,
                     post_update=spec.post_update(graphdef))
    rep = replicated(mesh)
    return jax.jit(step, out_shardings=(p_shard, o_shard, s_shard, rep, rep, rep),
                   donate_argnums=(0, 1, 2))


def compile_step(cfg: TrainConfig, model_cfg: GLPConfig | SAEConfig, mesh=None) -> dict:
    """AOT-compile one training step on abstract inputs (nothing is allocated) and return
    its cost and memory analysis: checks a configuration without data or accelerator."""
    mesh = mesh or make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    spec = (SAESpec(model_cfg, cfg.sae_dead_tokens, cfg.sae_aux_k, cfg.sae_aux_coef)
            if isinstance(model_cfg, SAEConfig) else GLPSpec(model_cfg))
    multi = isinstance(model_cfg, GLPConfig) and model_cfg.is_multi_layer
    with jax.set_mesh(mesh):
        graphdef, abs_params = nnx.split(spec.abstract())
        tx, _ = make_optimizer(cfg, cfg.total_steps)
        abs_opt = jax.eval_shape(tx.init, abs_params)
        abs_stats = jax.eval_shape(spec.init_stats)
        p_shard, o_shard = tree_shardings(abs_params, mesh), tree_shardings(abs_opt, mesh)
        s_shard = tree_shardings(abs_stats, mesh)
        x = jax.ShapeDtypeStruct((cfg.batch_size, model_cfg.d_input), jnp.float32,
                                 sharding=batch_sharding(mesh))
        layer = (jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32,
                                      sharding=batch_sharding(mesh, ndim=1))
                 if multi else None)
        step_fn = jit_train_step(cfg, spec, graphdef, tx, p_shard, o_shard, s_shard, mesh)
        t0 = time.perf_counter()
        compiled = step_fn.lower(abstract_with_shardings(abs_params, p_shard),
                                 abstract_with_shardings(abs_opt, o_shard),
                                 abstract_with_shardings(abs_stats, s_shard), x, layer,
                                 jnp.int32(0), jax.random.key(0)).compile()
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    from glp_jax.memplan import shard_bytes

    batch_bytes = shard_bytes([x] if layer is None else [x, layer],
                              [x.sharding] if layer is None else [x.sharding, layer.sharding])
    return {"compile_s": seconds, "flops": float((cost or {}).get("flops", float("nan"))),
            "params": spec.param_count(),
            "param_bytes": shard_bytes(abs_params, p_shard),
            "opt_bytes": shard_bytes(abs_opt, o_shard) + shard_bytes(abs_stats, s_shard),
            "batch_bytes": batch_bytes,
            "temp_bytes": getattr(mem, "temp_size_in_bytes", 0),
            "argument_bytes": getattr(mem, "argument_size_in_bytes", 0),
            "output_bytes": getattr(mem, "output_size_in_bytes", 0),
            "alias_bytes": getattr(mem, "alias_size_in_bytes", 0)}
