"""reports/REPORT.md from a reproduction's folder: six findings beside the paper's numbers.

Reads only files (plan.json, timings.json, sweep/scaling.json, evals/*.json, plots), so it
can be rerun on a finished reproduction (`glp reproduce --report-only`) or on a tiny sweep
in a test. Writes REPORT.md, findings.json and copies the PNGs it cites next to them.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from glp_jax.errors import GLPError
from glp_jax.reproduce import findings as F
from glp_jax.rundir import write_atomic, write_results

DESIGN_NOTES = "experiments/reproduce/sweep_design.md"
# {part: note}: how a part's time was measured when it was not by `glp reproduce` itself
# (e.g. stores extracted beforehand with `glp extract`); written by hand, printed as given.
TIMING_NOTES = "timing_notes.json"


def cpu_model() -> str:
    """The CPU's model name (the project's 2-core boxes differ up to 2.5x)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_findings(root: Path, seed: int = 0) -> list[F.Finding]:
    """Every finding whose result files exist under `root` (missing ones are skipped)."""
    root = Path(root)
    scaling = _read(root / "sweep" / "scaling.json")
    evals = root / "evals"
    out = []
    if scaling:
        out.append(F.finding_loss_law(scaling))
    if (t1 := _read(evals / "table1.json")) is not None:
        from glp_jax.reproduce.run import ROBUST_TABLE1

        out.append(F.finding_fd(t1, _read(evals / f"{ROBUST_TABLE1}.json")))
    if (t2 := _read(evals / "table2.json")) is not None:
        out.append(F.finding_delta_lm(t2, seed=seed))
    if (pr := _read(evals / "probe.json")) is not None:
        out.append(F.finding_probe(pr, seed=seed))
    from glp_jax.reproduce.run import STEER_VARIANTS

    steers = {norm: s for norm, name in STEER_VARIANTS
              if (s := _read(evals / f"{name}.json")) is not None}
    if steers:
        out.append(F.finding_steering(steers, seed=seed))
    if scaling and scaling.get("downstream"):
        out.append(F.finding_utility(scaling))
    return out


def _measured_layer(root: Path):
    """The LLM layer the evaluations ran on (the plan may say None = the middle one)."""
    for name in ("table2", "steer"):
        res = _read(root / "evals" / f"{name}.json")
        if res and res.get("layer") is not None:
            return res["layer"]
    return None


def _plot_sources(root: Path) -> dict[str, Path]:
    """Report file name -> where the reproduction wrote it."""
    src = {p.name: p for p in sorted((root / "plots").glob("*.png"))}
    for name in ("steer_pareto.png", "steer_diffmean_pareto.png"):
        src[name] = root / "evals" / name
    table1 = _read(root / "evals" / "table1.json")
    if table1:
        glps = [r for r in table1["rows"] if "depth" in r]
        if glps:
            best = min(glps, key=lambda r: r["fd"])
            src["fd_pca.png"] = Path(best["path"]) / "evals" / "fd_pca.png"
    return src


def write_report(root: Path, report_dir: Path, *, seed: int = 0) -> Path:
    root, report_dir = Path(root), Path(report_dir)
    if not (root / "plan.json").is_file():
        raise GLPError(f"{root} holds no reproduction (no plan.json); run `glp reproduce` first")
    plan = json.loads((root / "plan.json").read_text())
    found = collect_findings(root, seed=seed)
    if not found:
        raise GLPError(f"{root} has no finished results yet (no sweep/scaling.json, no evals/); "
                       f"run `glp reproduce` to produce them")
    report_dir.mkdir(parents=True, exist_ok=True)
    sources = _plot_sources(root)
    for f in found:
        kept = []
        for name in f.plots:
            if name in sources and sources[name].is_file():
                shutil.copyfile(sources[name], report_dir / name)
                kept.append(name)
        f.plots = kept
    timings = _read(root / "timings.json") or {}
    notes = _read(root / TIMING_NOTES) or {}
    plan = {**plan, "layer": plan.get("layer") if plan.get("layer") is not None
            else _measured_layer(root)}
    md = report_markdown(plan, found, timings, cpu_model(), notes)
    write_atomic(report_dir / "REPORT.md", md)
    write_results(report_dir, "findings", {"plan": plan, "timings_s": timings,
                                           "cpu": cpu_model(),
                                           "findings": [f.to_dict() for f in found]})
    return report_dir / "REPORT.md"


def report_markdown(plan: dict, found: list[F.Finding], timings: dict, cpu: str,
                    timing_notes: dict | None = None) -> str:
    total = sum(timings.values())
    lines = ["# Does glp_jax reproduce the paper?", "",
             f"`glp reproduce` on {plan['model']} layer {plan['layer'] or 'middle'} "
             f"({plan['corpus']} corpus): {plan['train_rows']:,} train / {plan['val_rows']:,} "
             f"held-out activation rows, {sizes_text(plan)} x {plan['activations']:,} "
             f"activations each, TopK SAE and PCA baselines, every evaluation of the paper at "
             f"reduced size. Measured time: **{total / 60:.0f} min** of compute over all "
             f"invocations on {cpu} (see Time). Each finding is judged by a 95% interval: "
             f"*reproduced* (on the paper's side), *not reproduced* (on the other side) or "
             f"*inconclusive* (contains zero).", "",
             "| # | finding | paper | verdict |", "|---|---|---|---|"]
    for i, f in enumerate(found, 1):
        lines.append(f"| {i} | [{f.title}](#{i}-{_anchor(f.title)}) | {f.paper} | "
                     f"**{f.verdict}** |")
    for i, f in enumerate(found, 1):
        lines += ["", f"## {i}. {f.title}", "", f"**Verdict: {f.verdict}.** {f.deciding}.", "",
                  f"Paper: {f.paper}.", "", *f.table]
        if f.notes:
            lines += ["", *[f"- {n}" for n in f.notes]]
        for p in f.plots:
            lines += ["", f"![{p}]({p})"]
    design = _design_notes()
    if design:
        lines += ["", "## Sweep design", "", design.strip()]
    lines += ["", "## What was reduced from the paper", "", *reductions_table(plan)]
    lines += ["", "## Time", "", f"CPU: {cpu}. Seconds per part, summed over every "
              f"invocation (a resumed run adds up):", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |"]
    lines += ["", *[f"- {k}: {v}" for k, v in (timing_notes or {}).items()]]
    lines += ["",
              "Rerun: `make reproduce` (or `glp reproduce config=...`; a rerun skips every "
              "finished part). The plan used is below; `findings.json` holds every number of "
              "this report for programs.", "", "```json", json.dumps(plan, indent=1), "```"]
    return "\n".join(lines) + "\n"


def sizes_text(plan: dict) -> str:
    widths = plan.get("widths") or []
    if not widths:
        return f"depths {', '.join(map(str, plan['depths']))}"
    ratio = plan.get("mlp_ratio", 2)
    return "sizes " + ", ".join(f"d{d} (d_model {w}, d_mlp {ratio * w})"
                                for d, w in zip(plan["depths"], widths, strict=True))


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def _design_notes() -> str | None:
    from glp_jax.config import SOURCE_ROOT

    path = SOURCE_ROOT / DESIGN_NOTES
    return path.read_text() if path.is_file() else None


def reductions_table(plan: dict) -> list[str]:
    rows = [
        ("LLM, layer", "Llama-3.2-1B layer 7 (d=2048); Llama-3.1-8B layer 15",
         f"{plan['model']} layer {plan['layer'] or 'middle'}"),
        ("training activations", "1.024e9 per run (FineWeb)",
         f"{plan['activations']:,} per run, from {plan['train_rows']:,} rows"),
        ("GLP sizes", "depth 3, 6, 12, 24 at d_model 2d = 4096, d_mlp 8192 (453M-3.3B params)",
         sizes_text(plan)),
        ("FD", "50k samples x 1000 Euler steps vs 50k held-out rows (one per document)",
         f"{plan['fd_samples']:,} samples x {plan['fd_steps']} steps vs {plan['fd_samples']:,} "
         f"held-out rows ({plan['fd_reference']})"),
        ("delta LM loss", "2048 sequences x 128 tokens",
         f"{plan['dlm_seqs']} sequences x {plan['dlm_length']} tokens"),
        ("1-D probing", "113 SAE-Probes tasks",
         f"{plan['probe_tasks']} fortune category tasks x <= {plan['probe_rows']} texts"),
        ("steering", "100 prompts, r in 0.2..2.0, LLM judge",
         f"{plan['steer_prompts']} prompts, r in {plan['steer_rs']}, VADER concept + NLL "
         f"fluency"),
    ]
    return ["| | paper | this reproduction |", "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
