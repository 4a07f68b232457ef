"""The trace summary (glp_jax.profiling) against independent counts of the same step.

The matmul FLOPs it reads from the compiled HLO and the executed trace events must equal
the FLOPs of every dot_general in the step's jaxpr (scan bodies times their length), and
its parts must add up to the measured wall time.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glp_jax.config import make_config
from glp_jax.model import GLP, GLPConfig
from glp_jax.profiling import dims, markdown, parse_hlo, summarize
from glp_jax.train import make_optimizer, make_train_step


def _step(d: int, n_layers: int, batch: int):
    gcfg = GLPConfig(d_input=d, n_layers=n_layers).resolved()
    graphdef, params = nnx.split(GLP(gcfg, rngs=nnx.Rngs(0)))
    tx, _ = make_optimizer(make_config(dict(train_dataset="x", batch_size=batch,
                                            num_steps=10)), 10)
    step = jax.jit(make_train_step(graphdef, tx, accum=1, compute_dtype=jnp.float32,
                                   discrete=True))
    args = (params, tx.init(params), jax.random.normal(jax.random.key(1), (batch, d)), None,
            jnp.int32(0), jax.random.key(2))
    return step, args


def _jaxpr_dot_flops(jaxpr) -> int:
    """2 x out elements x contracted size of every dot_general, scans times their length."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_c, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in lhs_c)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        reps = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += reps * _jaxpr_dot_flops(inner)
    return total


def test_hlo_shapes_parse():
    instrs, comps = parse_hlo(
        "ENTRY %main (p0: f32[4,8]) -> f32[4,2] {\n"
        "  %p0 = f32[4,8]{1,0} parameter(0)\n"
        "  %w = f32[8,2]{1,0} constant({...})\n"
        "  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %w), lhs_contracting_dims={1}, "
        'rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}\n}\n')
    assert list(comps) == ["main"] and dims(instrs["dot.1"].shape) == [4, 2]
    assert instrs["dot.1"].opcode == "dot" and instrs["dot.1"].op_name == "jit(f)/dot_general"
    assert dims("f32[]") == []


@pytest.mark.parametrize("n_layers", [3])
def test_trace_matmul_flops_match_the_jaxpr(tmp_path, n_layers):
    step, args = _step(d=32, n_layers=n_layers, batch=16)
    expected = _jaxpr_dot_flops(jax.make_jaxpr(step)(*args).jaxpr)
    hlo = step.lower(*args).compile().as_text()
    jax.block_until_ready(step(*args))
    steps = 3
    jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(*args))
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    summary = summarize(str(tmp_path), hlo, steps, wall)
    cats = summary["categories"]
    gflop = cats["matmul"]["gflop"]
    assert gflop * 1e9 == pytest.approx(expected, rel=1e-9)
    parts = sum(c["ms"] for c in cats.values())
    assert parts == pytest.approx(summary["wall_ms"], rel=1e-9)
    assert all(c["ms"] >= 0 for c in cats.values())
    table = markdown(summary)
    assert table.count("\n") == len(cats) + 2
