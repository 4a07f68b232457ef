"""Where a compiled step's time goes: a jax.profiler trace read back op by op.

XLA:CPU's thunk runtime records one trace event per executed HLO instruction (a fusion, a
dot, a while loop). `summarize` joins those events with the compiled HLO text: matmuls (dots
and the fusions that wrap one) get their FLOPs from the shapes, everything else is sorted
into elementwise work (forward / backward / the rest: loss, optimizer) and data movement
(slices, update-slices, broadcasts, copies: the scan's bookkeeping). Time the executor
spends outside any instruction is reported as such, so the parts add up to the wall time.

An instruction runs from its event's start to its `end: <name>` event (when its result is
ready: some dots run asynchronously in Eigen's pool, the launch event is short). The
executor runs independent instructions side by side, so each instant of the step is split
equally among the instructions running then: the parts add up to the wall time exactly,
and a category's share is the share of the step it accounts for.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ([^ ]+(?: [^ ]+)?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_MOVE_OPS = {"parameter", "bitcast", "dynamic-slice", "dynamic-update-slice", "broadcast",
             "constant", "copy", "slice", "concatenate", "reshape", "transpose", "tuple",
             "get-tuple-element", "pad", "iota"}


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    rest: str
    op_name: str = ""
    calls: str | None = None


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)


def dims(shape: str) -> list[int]:
    """[1024, 1152] from 'f32[1024,1152]{1,0}' (a scalar is [])."""
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(v) for v in m.group(1).split(",") if v] if m else []


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, Computation]]:
    """Every instruction by name (names are unique in a module) and every computation."""
    instrs: dict[str, Instr] = {}
    comps: dict[str, Computation] = {}
    current = None
    for line in text.splitlines():
        if (m := _COMP.match(line)) is not None:
            current = comps.setdefault(m.group(1), Computation(m.group(1)))
            continue
        if current is None or (m := _INSTR.match(line)) is None:
            continue
        name, shape, opcode, rest = m.groups()
        op = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        ins = Instr(name, shape, opcode, rest, op.group(1) if op else "",
                    calls.group(1) if calls else None)
        instrs[name] = ins
        current.instrs.append(ins)
    return instrs, comps


def dot_flops(ins: Instr, instrs: dict[str, Instr]) -> int:
    """2 x output elements x contracted size of one dot instruction."""
    lhs = re.match(r"\s*%([\w.\-]+)", ins.rest)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
    if lhs is None or contracting is None or lhs.group(1) not in instrs:
        return 0
    lhs_dims = dims(instrs[lhs.group(1)].shape)
    k = 1
    for c in contracting.group(1).split(","):
        if c:
            k *= lhs_dims[int(c)]
    out = 1
    for v in dims(ins.shape):
        out *= v
    return 2 * out * k


def classify(ins: Instr, instrs, comps) -> tuple[str, int]:
    """(category, matmul FLOPs) of one executed instruction."""
    if ins.opcode == "while":
        return "loop control (while)", 0
    body = comps[ins.calls].instrs if ins.opcode == "fusion" and ins.calls in comps else [ins]
    flops = sum(dot_flops(i, instrs) for i in body if i.opcode in ("dot", "convolution"))
    if flops:
        return "matmul", flops
    if all(i.opcode in _MOVE_OPS for i in body):
        return "data movement (slices, broadcasts, copies)", 0
    where = ins.op_name or next((i.op_name for i in body if i.op_name), "")
    if "transpose(jvp" in where:
        return "elementwise, backward", 0
    if "jvp(" in where:
        return "elementwise, forward", 0
    return "elementwise, loss + optimizer + rest", 0


def trace_events(trace_dir: str) -> list[dict]:
    """Complete ('X') events of the newest perfetto trace under trace_dir."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (create_perfetto_trace)")
    with gzip.open(files[-1]) as f:
        obj = json.load(f)
    events = obj["traceEvents"] if isinstance(obj, dict) else obj
    return [e for e in events if e.get("ph") == "X"]


def executions(events: list[dict], names: set[str]) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every executed instruction. The end is its
    `end: <name>` event (the result is ready), or the event's own end when later; a while
    loop is left out: its body's instructions cover it."""
    starts = collections.defaultdict(list)
    ends = collections.defaultdict(list)
    for e in events:
        if e["name"] in names:
            starts[e["name"]].append((e["ts"], e["ts"] + e["dur"]))
        elif e["name"].startswith("end: ") and e["name"][5:] in names:
            ends[e["name"][5:]].append(e["ts"])
    out = []
    for name, spans in starts.items():
        done = sorted(ends.get(name, []))
        j = 0
        for t0, t1 in sorted(spans):
            while j < len(done) and done[j] < t0:
                j += 1
            if j < len(done):
                t1 = max(t1, done[j])
                j += 1
            out.append((t0, t1, name))
    return out


def shared_wall_time(runs: list[tuple[float, float, str]]) -> dict[str, float]:
    """Microseconds of wall time per name, each instant split equally among the
    instructions running then (the executor runs independent instructions side by side),
    so the parts never add up to more than the wall time."""
    points = sorted([(t0, 1, i) for i, (t0, _, _) in enumerate(runs)]
                    + [(t1, -1, i) for i, (_, t1, _) in enumerate(runs)])
    out: dict[str, float] = collections.Counter()
    active: set[int] = set()
    last = None
    for t, kind, i in points:
        if active and last is not None and t > last:
            share = (t - last) / len(active)
            for a in active:
                out[runs[a][2]] += share
        last = t
        if kind > 0:
            active.add(i)
        else:
            active.discard(i)
    return out


def summarize(trace_dir: str, hlo_text: str, steps: int, wall_s: float) -> dict:
    """Per category: ms of the step's wall time (shared among instructions that run at the
    same time), its share, GFLOP per step; the ten instructions taking most wall time."""
    instrs, comps = parse_hlo(hlo_text)
    names = {n for n, ins in instrs.items() if ins.opcode != "while"}
    runs = executions(trace_events(trace_dir), names)
    times = shared_wall_time(runs)
    counts = collections.Counter(name for _, _, name in runs)
    cats: dict[str, dict] = {}
    top = []
    for name, us in times.items():
        cat, flops = classify(instrs[name], instrs, comps)
        c = cats.setdefault(cat, {"ms": 0.0, "gflop": 0.0, "count": 0})
        c["ms"] += us / 1e3 / steps
        c["gflop"] += flops * counts[name] / steps / 1e9
        c["count"] += 1
        top.append((us / 1e3 / steps, name, cat, instrs[name].shape))
    wall_ms = wall_s * 1e3
    cats["host and executor (no instruction running)"] = {
        "ms": wall_ms - sum(c["ms"] for c in cats.values()), "gflop": 0.0, "count": 0}
    for c in cats.values():
        c["share"] = c["ms"] / wall_ms
    return {"wall_ms": wall_ms, "categories": cats,
            "slowest": [dict(ms=ms, name=n, category=c, shape=s)
                        for ms, n, c, s in sorted(top, reverse=True)[:10]]}


def markdown(summary: dict) -> str:
    """The categories as a Markdown table."""
    rows = ["| part of the step | ms per step | share | GFLOP/s |", "|---|---|---|---|"]
    for cat, c in sorted(summary["categories"].items(), key=lambda kv: -kv[1]["ms"]):
        gfs = f"{c['gflop'] / (c['ms'] / 1e3):,.0f}" if c["gflop"] else ""
        rows.append(f"| {cat} | {c['ms']:,.1f} | {c['share']:.3f} | {gfs} |")
    rows.append(f"| **step (wall)** | **{summary['wall_ms']:,.1f}** | 1.000 | |")
    return "\n".join(rows)
