"""Memory plan: what one training step of a config needs per device on a given mesh.

The real train step (real shapes, real shardings, donation, accumulation, remat) is lowered
and compiled over `data x fsdp` simulated CPU devices with abstract arrays: nothing is
allocated, so a 3B-parameter config is planned on a laptop. Per device:

  params, optimizer state  exact, from each leaf's shard shape (the shardings training uses)
  batch                    the step's inputs (x, layer ids)
  temporaries              XLA's buffer assignment of the compiled step (activations,
                           gradients, fusion buffers); a CPU compile, so an estimate of
                           what a GPU/TPU compile assigns (which fuses differently)
  total                    arguments + outputs - donated aliases + temporaries

Targets are the HBM of common accelerators; a plan "fits" when the total is within
`USABLE` of it (XLA on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION is set).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GiB = 2**30
# name -> (what, bytes of device memory)
TARGETS = {
    "h100": ("NVIDIA H100 80GB", int(79.6 * GiB)),
    "h200": ("NVIDIA H200 141GB", int(140.4 * GiB)),
    "v5e": ("TPU v5e", 16 * GiB),
    "v5p": ("TPU v5p", 95 * GiB),
    "v6e": ("TPU v6e", 32 * GiB),
}
USABLE = 0.9


@dataclass
class MemoryPlan:
    mesh: tuple[int, int]  # (data, fsdp)
    batch: int  # global batch per optimizer step
    accum: int  # gradient accumulation steps
    remat: bool
    params: int  # parameters (count)
    param_bytes: int  # per device
    opt_bytes: int
    batch_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    total_bytes: int
    compile_s: float

    @property
    def micro_batch_per_device(self) -> int:
        """Rows per device per forward/backward (the batch is split over data and fsdp)."""
        return self.batch // self.accum // (self.mesh[0] * self.mesh[1])

    def fits(self, target: str | int) -> bool:
        return self.total_bytes <= USABLE * target_bytes(target)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "micro_batch_per_device": self.micro_batch_per_device,
                "fits": {t: self.fits(t) for t in TARGETS}}


def target_bytes(target: str | int) -> int:
    """A named device (TARGETS) or a number of bytes."""
    if isinstance(target, str) and target in TARGETS:
        return TARGETS[target][1]
    try:
        return int(float(target))
    except ValueError:
        from glp_jax.errors import ConfigError

        raise ConfigError(f"unknown memory target {target!r}: use one of {', '.join(TARGETS)} "
                          f"or a number of bytes") from None


def shard_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs under `shardings`."""
    import jax

    leaves = jax.tree.leaves(abstract_tree)
    shards = jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(leaves, shards, strict=True))


def simulated_mesh(data: int, fsdp: int):
    """A data x fsdp mesh over CPU devices (`jax_num_cpu_devices` must allow data * fsdp)."""
    import jax

    from glp_jax.errors import ConfigError
    from glp_jax.sharding import make_mesh

    n = data * fsdp
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise ConfigError(f"the mesh {data}x{fsdp} needs {n} simulated devices but this process "
                          f"has {len(cpus)} CPU devices; plan it in a fresh process (`glp config "
                          f"check ... --mesh data={data},fsdp={fsdp}` sets them up)")
    return make_mesh(data, fsdp, devices=cpus[:n])


def use_simulated_devices(n: int) -> None:
    """Ask for n CPU devices; only possible before JAX starts its backends."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:  # backends already up: simulated_mesh reports what is missing
        pass


def memory_plan(cfg, model_cfg, data: int, fsdp: int) -> MemoryPlan:
    """Compile the step of `cfg` (a TrainConfig) for `model_cfg` on a data x fsdp mesh."""
    from glp_jax.train import compile_step

    res = compile_step(cfg, model_cfg, simulated_mesh(data, fsdp))
    return MemoryPlan(
        mesh=(data, fsdp), batch=cfg.batch_size, accum=cfg.gradient_accumulation_steps,
        remat=bool(cfg.remat_blocks), params=res["params"], param_bytes=res["param_bytes"],
        opt_bytes=res["opt_bytes"], batch_bytes=res["batch_bytes"],
        temp_bytes=res["temp_bytes"], output_bytes=res["output_bytes"],
        alias_bytes=res["alias_bytes"],
        total_bytes=res["argument_bytes"] + res["output_bytes"] - res["alias_bytes"]
        + res["temp_bytes"],
        compile_s=res["compile_s"])


def fit(cfg, model_cfg, data: int, fsdp: int, target: str | int
        ) -> tuple[MemoryPlan | None, list]:
    """The plan with the largest micro-batch that fits `target`: gradient accumulation
    1, 2, 4, ... (while it divides the per-device batch), then the same with remat.
    Returns (best or None, every plan tried)."""
    tried = []
    for remat in (False, True):
        accum = 1
        per_device = cfg.batch_size // (data * fsdp)
        while per_device % accum == 0 and accum <= per_device:
            c = dataclasses.replace(cfg, gradient_accumulation_steps=accum, remat_blocks=remat)
            plan = memory_plan(c, model_cfg, data, fsdp)
            tried.append(plan)
            if plan.fits(target):
                return plan, tried
            accum *= 2
    return None, tried


def plan_table(plans: list[MemoryPlan]) -> str:
    """Markdown: one row per plan, GiB per device, and which targets it fits."""
    head = ("| mesh data x fsdp | batch | accum | remat | micro-batch/device | params | "
            "optimizer | batch | temporaries | total | fits |\n|---|---|---|---|---|---|---|"
            "---|---|---|---|")
    rows = [f"| {p.mesh[0]} x {p.mesh[1]} | {p.batch} | {p.accum} | {'yes' if p.remat else 'no'} | "
            f"{p.micro_batch_per_device} | {p.param_bytes / GiB:.2f} | {p.opt_bytes / GiB:.2f} | "
            f"{p.batch_bytes / GiB:.3f} | {p.temp_bytes / GiB:.2f} | {p.total_bytes / GiB:.2f} | "
            f"{', '.join(t for t in TARGETS if p.fits(t)) or 'none'} |" for p in plans]
    return "\n".join([head, *rows])
