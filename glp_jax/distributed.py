"""Multi-host start-up: `jax.distributed.initialize()` when launched as one of several processes.

Cluster launchers (SLURM, Cloud TPU) are auto-detected by JAX. For several processes on one
machine or a hand-made cluster set GLP_COORDINATOR=host:port, GLP_NUM_PROCESSES and
GLP_PROCESS_ID. GLP_CPU_DEVICES=N simulates N CPU devices per process.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
    n_cpu = os.environ.get("GLP_CPU_DEVICES")
    if n_cpu:
        jax.config.update("jax_num_cpu_devices", int(n_cpu))
    coord = os.environ.get("GLP_COORDINATOR")
    if coord:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["GLP_NUM_PROCESSES"]),
                                   process_id=int(os.environ["GLP_PROCESS_ID"]))
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
          or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
        jax.distributed.initialize()  # JAX reads the cluster from SLURM / the TPU metadata
