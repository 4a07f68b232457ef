"""Training loop: flow-matching loss, optax AdamW, sharded jit step, orbax checkpoints.

The step is a pure function of (params, optimizer state, global batch, step): the noise
and sigma keys are `fold_in(seed key, step)`, so a run resumed from a checkpoint (params,
optimizer state, data-iterator state) reproduces the uninterrupted loss trajectory, and
1 device and N devices draw the same numbers (partitionable threefry).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glp_jax import flow
from glp_jax.checkpoint import RunCheckpoints, abstract_with_shardings
from glp_jax.config import TrainConfig
from glp_jax.data.pipeline import Pipeline, build_pipeline
from glp_jax.data.store import ActivationStore
from glp_jax.errors import ConfigError, GLPError
from glp_jax.layers import layer_position
from glp_jax.model import (
    GLP,
    GLPConfig,
    Normalizer,
    abstract_glp,
    matmul_flops_per_example,
    param_count,
)
from glp_jax.rundir import RunDir, epoch_step, jsonable
from glp_jax.sharding import batch_sharding, global_batch, make_mesh, replicated, tree_shardings


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
            remat: bool = False):
    model = nnx.merge(graphdef, params)
    k_sigma, k_eps = jax.random.split(key)
    sigma_B = flow.sample_train_sigma(k_sigma, x_BxD.shape[0], discrete=discrete)
    eps_BxD = jax.random.normal(k_eps, x_BxD.shape, jnp.float32)
    z_BxD = flow.add_noise(x_BxD, eps_BxD, sigma_B)
    v_BxD = model(z_BxD, sigma_B, layer_B, compute_dtype=compute_dtype, remat=remat)
    return flow.flow_loss(v_BxD, flow.velocity_target(x_BxD, eps_BxD))


def make_train_step(graphdef, tx, *, accum: int, compute_dtype, discrete: bool,
                    remat: bool = False):
    """(params, opt_state, x, layer, step, base_key) -> (params, opt_state, loss, grad_norm)."""
    grad_fn = jax.value_and_grad(partial(loss_fn, remat=remat))

    def step_fn(params, opt_state, x_BxD, layer_B, step, base_key):
        key = jax.random.fold_in(base_key, step)
        if accum == 1:
            loss, grads = grad_fn(params, graphdef, x_BxD, layer_B, key,
                                  compute_dtype=compute_dtype, discrete=discrete)
        else:
            # Micro-batch a = rows a, a+A, a+2A, ...: every device keeps its own rows.
            B = x_BxD.shape[0]
            xs = jnp.swapaxes(x_BxD.reshape(B // accum, accum, -1), 0, 1)
            ls = None if layer_B is None else jnp.swapaxes(layer_B.reshape(B // accum, accum), 0, 1)
            keys = jax.random.split(key, accum)

            def micro(acc, inp):
                xi, li, ki = inp
                loss_i, g = grad_fn(params, graphdef, xi, li, ki, compute_dtype=compute_dtype,
                                    discrete=discrete)
                return jax.tree.map(jnp.add, acc, g), loss_i

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, (xs, ls, keys))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = losses.mean()
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
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


# ----------------------------------------------------------------------------- setup
def glp_config_for(cfg: TrainConfig, d: int, n_store_layers: int) -> GLPConfig:
    if cfg.d_input is not None and cfg.d_input != d:
        raise ConfigError(f"d_input={cfg.d_input} but the store holds d={d} activations; "
                          f"drop d_input (it defaults to the store's d) or use a matching store")
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


def init_params(glp_cfg: GLPConfig, seed: int, mesh):
    """Sharded fp32 parameters (created directly in their shards under jit)."""
    graphdef, abstract_params = nnx.split(abstract_glp(glp_cfg))
    shardings = tree_shardings(abstract_params, mesh)

    @jax.jit
    def init():
        return nnx.split(GLP(glp_cfg, rngs=nnx.Rngs(seed)))[1]

    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, shardings


@dataclass
class RunInfo:
    params: int
    fwd_matmul_flops: int
    d_input: int
    d_model: int
    d_mlp: int
    n_layers: int
    devices: int
    device_kind: str
    processes: int


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Train (or resume) the run in cfg.output_path. Returns the final metrics row.

    stop_after_steps: leave after that many steps of this call (a simulated preemption
    for tests; the checkpoint at that point is written first).
    """
    mesh = mesh or make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    total = cfg.total_steps
    n_dev = mesh.devices.size
    if cfg.batch_size % n_dev or (cfg.batch_size // cfg.gradient_accumulation_steps) % n_dev:
        raise ConfigError(f"batch_size {cfg.batch_size} (per micro-batch "
                          f"{cfg.batch_size // cfg.gradient_accumulation_steps}) must be divisible "
                          f"by the {n_dev} devices")
    pipe = build_pipeline(cfg.pipeline_config())
    multi = len(pipe.layers) > 1
    glp_cfg = glp_config_for(cfg, pipe.d, len(pipe.layers))
    normalizer = normalizer_from_pipeline(pipe)
    run = RunDir(cfg.output_path)
    run_dir = run.path
    primary = jax.process_index() == 0
    compute_dtype = jnp.bfloat16 if cfg.use_bf16 else jnp.float32

    with jax.set_mesh(mesh):
        graphdef, abs_params = nnx.split(abstract_glp(glp_cfg))
        tx, schedule = make_optimizer(cfg, total)
        abs_opt = jax.eval_shape(tx.init, abs_params)
        p_shard, o_shard = tree_shardings(abs_params, mesh), tree_shardings(abs_opt, mesh)
        base_key = jax.random.key(cfg.seed)
        info = RunInfo(param_count(glp_cfg), matmul_flops_per_example(glp_cfg), glp_cfg.d_input,
                       glp_cfg.width, glp_cfg.mlp_width, glp_cfg.n_layers, n_dev,
                       jax.devices()[0].device_kind, jax.process_count())
        resolved = {**cfg.to_dict(), "glp": glp_cfg.to_dict(), "layers": pipe.layers,
                    "train_rows": pipe.rows, "run": dataclasses.asdict(info)}
        if run.started():
            run.check_resumable(resolved)
        elif primary:
            run.write_start(cfg.to_dict(), resolved, normalizer, pipe.layers)

        epoch_steps = {epoch_step(e, cfg.epoch_size, cfg.batch_size): e
                       for e in cfg.epoch_checkpoints()}
        ckpt = RunCheckpoints(run_dir, cfg.keep_last_n, cfg.async_checkpointing,
                              keep_steps=sorted(epoch_steps))
        it = pipe.make_iterator()
        start = ckpt.latest_step() or 0
        if start:  # restore straight into the shards: no initialised copy alongside
            target = abstract_with_shardings({"params": abs_params, "opt_state": abs_opt},
                                             {"params": p_shard, "opt_state": o_shard})
            state, data_state, _ = ckpt.restore(start, target)
            params, opt_state = state["params"], state["opt_state"]
            it.set_state(data_state)
        else:
            params = init_params(glp_cfg, cfg.seed, mesh)[1]
            opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
        metrics = run.metrics_log(start, primary)

        step_fn = jit_train_step(cfg, graphdef, tx, p_shard, o_shard, mesh)
        eval_fn, val = None, None
        if cfg.val_dataset:
            val = _validation_batch(cfg, pipe, normalizer, mesh)
            eval_fn = jax.jit(make_eval_fn(graphdef, cfg.eval_sigmas, compute_dtype))
        eval_steps = cfg.eval_steps()

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, unit="step", desc="train",
                   disable=not (cfg.progress and primary), dynamic_ncols=True)
        window: list[tuple[jax.Array, jax.Array]] = []
        t_window, last_row = time.perf_counter(), {}
        flops_exact_per_act = 3 * info.fwd_matmul_flops
        step, steps_this_call, rate_steps = start, 0, 0
        end = total if cfg.stop_at_step is None else min(total, cfg.stop_at_step)
        if cfg.data_mode == "single" and pipe.batches_per_epoch < total:
            raise ConfigError(
                f"num_steps {total} needs {total * cfg.batch_size:,} activations but "
                f"{cfg.train_dataset} holds {pipe.rows:,} rows x {len(pipe.layers)} layers "
                f"({pipe.batches_per_epoch} batches, single pass); lower num_steps / "
                f"num_activations, extract more rows, or set data_mode=repeat")
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
            params, opt_state, loss, gnorm = step_fn(params, opt_state, x, layer,
                                                     jnp.int32(step), base_key)
            window.append((loss, gnorm))
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
            stopping = ((stop_after_steps is not None and steps_this_call >= stop_after_steps)
                        or (cfg.stop_at_step is not None and step >= cfg.stop_at_step))
            if boundary_log or boundary_save or step in epoch_steps or stopping:
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
                       "activations_per_s": rate, "params": info.params,
                       "compute_6nd": 6.0 * info.params * acts,
                       "flops_exact": float(flops_exact_per_act) * acts,
                       "flops_per_s": rate * flops_exact_per_act,
                       "wall_time": time.time(), "devices": n_dev,
                       "device_kind": info.device_kind}
                if cfg.peak_flops:
                    row["mfu"] = rate * flops_exact_per_act / (cfg.peak_flops * n_dev)
                if eval_fn is not None and step in eval_steps:
                    row["val_loss"] = float(eval_fn(params, *val))
                metrics.write(row)
                last_row = row
                bar.set_postfix(loss=f"{row['loss']:.4f}", act_s=f"{rate:,.0f}")
                window, t_window, rate_steps = [], time.perf_counter(), 0
            if boundary_save or stopping or step in epoch_steps:
                ckpt.save(step, {"params": params, "opt_state": opt_state}, _data_state(it),
                          resolved, epoch=epoch_steps.get(step), force=True)
            if stopping:
                break
        bar.close()
        ckpt.wait()
        ckpt.close()
        _close(it)
    return last_row


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


def jit_train_step(cfg: TrainConfig, graphdef, tx, p_shard, o_shard, mesh):
    """The jitted step with the run's settings, output shardings and buffer donation."""
    return jax.jit(make_train_step(graphdef, tx, accum=cfg.gradient_accumulation_steps,
                                   compute_dtype=jnp.bfloat16 if cfg.use_bf16 else jnp.float32,
                                   discrete=cfg.sigma_sampling == "discrete",
                                   remat=cfg.remat_blocks),
                   out_shardings=(p_shard, o_shard, replicated(mesh), replicated(mesh)),
                   donate_argnums=(0, 1))


def compile_step(cfg: TrainConfig, glp_cfg: GLPConfig, mesh=None) -> dict:
    """AOT-compile one training step on abstract inputs (nothing is allocated) and return
    its cost and memory analysis: checks a configuration without data or accelerator."""
    mesh = mesh or make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    with jax.set_mesh(mesh):
        graphdef, abs_params = nnx.split(abstract_glp(glp_cfg))
        tx, _ = make_optimizer(cfg, cfg.total_steps)
        abs_opt = jax.eval_shape(tx.init, abs_params)
        p_shard, o_shard = tree_shardings(abs_params, mesh), tree_shardings(abs_opt, mesh)
        x = jax.ShapeDtypeStruct((cfg.batch_size, glp_cfg.d_input), jnp.float32,
                                 sharding=batch_sharding(mesh))
        layer = (jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32,
                                      sharding=batch_sharding(mesh, ndim=1))
                 if glp_cfg.is_multi_layer else None)
        step_fn = jit_train_step(cfg, graphdef, tx, p_shard, o_shard, mesh)
        t0 = time.perf_counter()
        compiled = step_fn.lower(abstract_with_shardings(abs_params, p_shard),
                                 abstract_with_shardings(abs_opt, o_shard), x, layer,
                                 jnp.int32(0), jax.random.key(0)).compile()
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"compile_s": seconds, "flops": float((cost or {}).get("flops", float("nan"))),
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "argument_bytes": getattr(mem, "argument_size_in_bytes", None)}
