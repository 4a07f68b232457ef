"""Device mesh and parameter sharding rules.

Mesh axes: `data` (pure data parallel) and `fsdp` (data parallel that also shards
parameters and optimizer state). Batches are split over both axes; a parameter is split
over `fsdp` along its largest dimension divisible by the fsdp size (replicated otherwise).
Axis types are Auto so XLA inserts the collectives (see JAX_NOTES.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from glp_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(n_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """Fill a -1 axis with the remaining devices; the product must equal n_devices."""
    if data == -1 and fsdp == -1:
        raise ConfigError("at most one of mesh_data / mesh_fsdp may be -1")
    if data == -1:
        if n_devices % fsdp:
            raise ConfigError(f"mesh_fsdp={fsdp} does not divide the {n_devices} devices")
        data = n_devices // fsdp
    if fsdp == -1:
        if n_devices % data:
            raise ConfigError(f"mesh_data={data} does not divide the {n_devices} devices")
        fsdp = n_devices // data
    if data * fsdp != n_devices:
        raise ConfigError(f"mesh {data}x{fsdp} (data x fsdp) needs {data * fsdp} devices, "
                          f"but {n_devices} are available; use -1 to fill an axis")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(len(devices), data, fsdp)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES, axis_types=auto)


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest fsdp-divisible dimension of a parameter over `fsdp`."""
    if fsdp_size <= 1 or len(shape) == 0:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % fsdp_size == 0 and shape[i] >= fsdp_size:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every array leaf of a (params or optimizer-state) pytree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """Assemble the global batch from this process's rows (multi-host safe)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
