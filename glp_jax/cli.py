"""The one `glp` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from glp_jax.errors import GLPError
from glp_jax.preempt import Preempted
from glp_jax.progress import quiet_third_party_bars


def _parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    if text in (None, "", "middle"):
        return None  # ExtractConfig's default: the middle layer
    if text == "all":
        return list(range(n_layers))
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise GLPError(f"--layers must be comma-separated ints, 'middle' or 'all', got {text!r}") from e


def positive_int(text: str) -> int:
    """argparse type for counts: `--n 0` or `--n -5` is refused in one line, not deep in JAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _worker_ids(args) -> tuple[int, int]:
    """(worker, workers) from --worker/--workers; `--workers slurm` reads SLURM_PROCID and
    SLURM_NTASKS (one worker per srun task)."""
    if args.workers == "slurm":
        if "SLURM_NTASKS" not in os.environ or "SLURM_PROCID" not in os.environ:
            raise GLPError("--workers slurm needs SLURM_NTASKS and SLURM_PROCID: run it under "
                           "srun, or give --worker I --workers N")
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    try:
        workers = int(args.workers)
    except ValueError:
        raise GLPError(f"--workers must be a positive integer or 'slurm', got {args.workers!r}") from None
    if workers < 1 or not 0 <= args.worker < workers:
        raise GLPError(f"--worker {args.worker} is not in [0, --workers {workers}); number the "
                       f"workers 0..{workers - 1}")
    return args.worker, workers


def _open_extract_store(args, meta, worker: int, workers: int):
    """The store this process writes: --out itself, or its worker's sub-store under it."""
    from glp_jax.data.multistore import is_multi_root, open_worker_for_writing
    from glp_jax.data.store import ActivationStore

    if workers > 1:
        return open_worker_for_writing(args.out, meta, worker, workers, args.worker_block_rows)
    if is_multi_root(args.out):
        raise GLPError(f"{args.out} holds a multi-worker store: pass --worker I --workers N "
                       f"with its worker count")
    return ActivationStore.open_for_writing(args.out, meta, "glp extract")


def cmd_extract(args) -> int:
    from glp_jax.config import ExtractConfig
    from glp_jax.data.corpus import WorkerShard, open_corpus
    from glp_jax.data.multistore import worker_share
    from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta
    from glp_jax.llm.loading import load_causal_lm, load_config, model_id_of
    from glp_jax.preempt import PreemptionGuard

    if args.max_tokens <= 0:
        raise GLPError(f"--max-tokens must be positive, got {args.max_tokens}")
    worker, workers = _worker_ids(args)
    llm_cfg = load_config(args.model)
    n_layers = int(llm_cfg.num_hidden_layers)
    cfg = ExtractConfig(
        model=args.model, layers=_parse_layers(args.layers, n_layers), corpus=args.corpus,
        split=args.split, val_docs=args.val_docs, seed=args.seed, token_policy=args.policy,
        tokens_per_doc=args.tokens_per_doc, max_length=args.max_length, dtype=args.dtype,
        llm_dtype=args.llm_dtype, device=args.device, batch_tokens=args.batch_tokens,
        window_docs=args.window_docs, flush_rows=args.flush_rows).for_model(n_layers)
    corpus = open_corpus(cfg.corpus)
    model_id = model_id_of(cfg.model)
    meta = extraction_meta(cfg, model_id, int(llm_cfg.hidden_size), corpus.name)
    target = worker_share(args.max_tokens, worker, workers)
    if target == 0:
        raise GLPError(f"--max-tokens {args.max_tokens} leaves worker {worker} of {workers} no "
                       f"rows; give at least one row per worker or fewer --workers")
    if workers > 1:
        corpus = WorkerShard(corpus, worker, workers)
    # Take the writer lock and validate against an existing store before the (slow) weight
    # load; a second writer or a mismatch is refused and changes nothing. A SIGTERM/SIGINT
    # stops at the next window boundary with the finished documents committed (exit 75).
    with PreemptionGuard() as guard, _open_extract_store(args, meta, worker, workers) as store:
        lm = load_causal_lm(cfg.model, dtype=cfg.llm_dtype, device=cfg.device)
        res = extract_to_store(Extractor(lm, cfg), corpus, store, target,
                               progress=not args.quiet, guard=guard)
    rate = res.tokens_run / res.seconds if res.seconds else 0.0
    who = f" worker {worker}/{workers}" if workers > 1 else ""
    print(f"store {args.out}{who}: {res.rows} rows (+{res.rows_added}), layers {cfg.layers}, "
          f"d={meta.d}, {res.docs_done} documents done, {rate:.0f} tokens/s over {res.seconds:.1f} s")
    return 0


def cmd_store_info(args) -> int:
    from glp_jax.data.store import ActivationStore
    from glp_jax.data.verify import CHECKSUM_TEXT

    info = ActivationStore.open(args.path).info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    size = info["size_on_disk_bytes"]
    print(f"store:   {info['url']}")
    print(f"rows:    {info['rows']:,}")
    print(f"d:       {info['d']}   dtype: {info['dtype']}   layers: {info['layers']}")
    print(f"model:   {info['model']}   hook: {info['hook']}")
    print(f"corpus:  {info['corpus']} [{info['split']}]   policy: {info['token_policy']}   "
          f"max_length: {info['max_length']}   seed: {info['seed']}")
    print(f"size:    {'n/a' if size is None else f'{size / 2**20:.1f} MiB'}")
    print(f"layout:  shards of {info['shard_rows']:,} rows, inner chunks of {info['chunk_rows']} "
          f"rows (a random row costs one chunk read)")
    print(f"checks:  {CHECKSUM_TEXT[info['checksums']]}")
    print(f"created: {info['created_by']}")
    if "workers" in info:  # a multi-worker store: one logical store over worker sub-stores
        ws = info["workers"]
        print(f"workers: {len(ws)} (blocks of {info['block_rows']:,} rows, round-robin); "
              f"{info['committed_rows']:,} rows committed, {info['rows']:,} visible in order; "
              f"stats below cover every committed row")
        for w in ws:
            state = ("finished" if w["finished"] else "running/stopped" if w["started"]
                     else "not started")
            print(f"  worker {w['worker']}: {w['rows']:,} rows, {w['visible']:,} visible, {state}")
    for k, s in info["stats"].items():
        if s["count"]:
            print(f"layer {k}: count {s['count']:,}  mean|mu| {s['mean_abs_mean']:.4g}  "
                  f"std mean {s['mean_std']:.4g} min {s['min_std']:.4g} max {s['max_std']:.4g}")
        else:
            print(f"layer {k}: empty")
    return 0


def cmd_store_verify(args) -> int:
    from glp_jax.data.verify import report_lines, verify_store

    report = verify_store(args.path, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print("\n".join(report_lines(report)))
    return 0 if report.ok else 1


def cmd_store_import(args) -> int:
    from glp_jax.interop.original_data import import_original

    store = import_original(args.src, args.dst, model=args.model, layer=args.layer,
                            progress=not args.quiet)
    print(f"imported {len(store):,} rows (d={store.d}) from {args.src} into {args.dst}")
    return 0


def cmd_train(args) -> int:
    from glp_jax.config import load_config

    cfg = load_config(args.overrides)  # a bad key or value fails before JAX is imported

    from glp_jax.distributed import maybe_initialize
    from glp_jax.train import train

    maybe_initialize()
    row = train(cfg)
    if row:
        print(f"step {row['step']}: loss {row['loss']:.4f}"
              + (f", val_loss {row['val_loss']:.4f}" if "val_loss" in row else "")
              + f" -> {cfg.output_path}")
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    glp = _load_glp(args.run, args.step)
    x = glp.sample(args.n, steps=args.steps, seed=args.seed, layer=args.layer)
    np.save(args.out, x)
    print(f"saved {x.shape[0]} samples [d={x.shape[1]}] from {glp.source} (step {glp.step}) "
          f"to {args.out}")
    return 0


def cmd_model_info(args) -> int:
    from glp_jax.config import load_config, parse_overrides
    from glp_jax.model import GLP_CONFIG_KEYS, model_info

    over = parse_overrides(args.overrides)
    if "config" in over:  # the model keys of a training config (parsed and checked as training does)
        cfg = load_config([f"config={over.pop('config')}"])
        base = {k: getattr(cfg, k) for k in GLP_CONFIG_KEYS if getattr(cfg, k) is not None}
        over = {**base, **over}
    info = model_info(over)
    print(f"params: {info['params']}")
    print(f"widths: d_input={info['d_input']} d_model={info['d_model']} d_mlp={info['d_mlp']} "
          f"n_layers={info['n_layers']} multi_layer_n_layers={info['multi_layer_n_layers']}")
    print(f"train FLOPs per activation: 6N = {info['train_flops_per_activation_6N']} "
          f"exact matmul = {info['train_flops_per_activation_matmul']}")
    return 0


def _parse_mesh(text: str) -> tuple[int, int]:
    try:
        kv = dict(item.split("=", 1) for item in text.replace(" ", "").split(","))
        data, fsdp = int(kv.pop("data", 1)), int(kv.pop("fsdp", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected data=A,fsdp=B, got {text!r}") from None
    if kv or data < 1 or fsdp < 1:
        raise argparse.ArgumentTypeError(f"expected data=A,fsdp=B with positive A, B, got {text!r}")
    return data, fsdp


def cmd_config_check(args) -> int:
    import dataclasses

    from glp_jax.config import load_config
    from glp_jax.model import GLPConfig, param_count
    from glp_jax.train import compile_step, glp_config_for

    if args.mesh:  # before anything starts JAX: the simulated devices of the largest mesh
        from glp_jax.memplan import use_simulated_devices

        use_simulated_devices(max(d * f for d, f in args.mesh))
    cfg = load_config(args.overrides)
    if args.batch:
        cfg = dataclasses.replace(cfg, batch_size=args.batch)
    if cfg.d_input is None:
        from glp_jax.data.store import ActivationStore

        cfg = dataclasses.replace(cfg, d_input=ActivationStore.open(cfg.train_dataset).d)
    n_store_layers = len(cfg.layers) if cfg.layers else 1
    if cfg.model == "sae":
        return _config_check_sae(cfg, args)
    glp_cfg = glp_config_for(cfg, cfg.d_input, n_store_layers)
    if args.mesh:
        return _memory_plans(cfg, glp_cfg, args)
    n = param_count(glp_cfg)
    acts = cfg.total_steps * cfg.batch_size
    print(f"ok: {glp_cfg}")
    print(f"params: {n}  steps: {cfg.total_steps}  activations: {acts:,}  "
          f"C=6ND: {6.0 * n * acts:.3e}  epoch checkpoints: {cfg.epoch_checkpoints()}")
    if args.compile:
        small = glp_cfg
        small_cfg = cfg
        if not args.full:  # same depth and width ratios, widths / shrink, small batch
            f = args.shrink
            small = GLPConfig(d_input=max(8, glp_cfg.d_input // f), d_model=max(8, glp_cfg.width // f),
                              d_mlp=max(8, glp_cfg.mlp_width // f), n_layers=glp_cfg.n_layers,
                              multi_layer_n_layers=glp_cfg.multi_layer_n_layers).resolved()
            small_cfg = dataclasses.replace(cfg, d_input=small.d_input, batch_size=64 *
                                            cfg.gradient_accumulation_steps)
        res = compile_step(small_cfg, small)
        from glp_jax.model import matmul_flops_per_example

        exact = 3 * matmul_flops_per_example(small) * small_cfg.batch_size
        print(f"compiled one step of {small} at batch {small_cfg.batch_size} in "
              f"{res['compile_s']:.1f} s: exact matmul FLOPs {exact:.3e} (XLA's estimate "
              f"{res['flops']:.3e} counts the scanned blocks once); temp memory "
              f"{res['temp_bytes'] / 2**30:.2f} GiB, arguments {res['argument_bytes'] / 2**30:.2f} GiB")
    return 0


def _memory_plans(cfg, model_cfg, args) -> int:
    """`glp config check --mesh ...`: the real step's memory per device on each mesh."""
    from glp_jax.memplan import TARGETS, USABLE, GiB, fit, memory_plan, plan_table, target_bytes

    plans, report = [], []
    for data, fsdp in args.mesh:
        if args.fit:
            best, tried = fit(cfg, model_cfg, data, fsdp, args.fit)
            plans += tried
            name = TARGETS[args.fit][0] if args.fit in TARGETS else f"{args.fit} bytes"
            report.append(f"mesh {data}x{fsdp}, {name}: " + (
                f"fits with accum {best.accum}{' and remat' if best.remat else ''} (micro-batch "
                f"{best.micro_batch_per_device} per device, {best.total_bytes / GiB:.2f} GiB of "
                f"{USABLE:.0%} x {target_bytes(args.fit) / GiB:.2f} GiB)" if best else
                "does not fit even at micro-batch 1 with remat: add fsdp devices"))
        else:
            plans.append(memory_plan(cfg, model_cfg, data, fsdp))
    if args.json:
        print(json.dumps({"config": str(model_cfg), "plans": [p.to_json() for p in plans],
                          "targets": {k: v[1] for k, v in TARGETS.items()}}, indent=1))
        return 0
    print(f"{model_cfg}: {plans[0].params:,} params; per device, GiB (a plan fits a target when "
          f"its total is within {USABLE:.0%} of the device's memory)")
    print(plan_table(plans))
    for line in report:
        print(line)
    return 0


def _config_check_sae(cfg, args) -> int:
    from glp_jax.sae import param_count
    from glp_jax.train import compile_step, sae_config_for

    sae_cfg = sae_config_for(cfg, cfg.d_input, len(cfg.layers) if cfg.layers else 1)
    n = param_count(sae_cfg)
    acts = cfg.total_steps * cfg.batch_size
    print(f"ok: {sae_cfg}")
    print(f"params: {n}  steps: {cfg.total_steps}  activations: {acts:,}  "
          f"C=6ND: {6.0 * n * acts:.3e}")
    if args.compile:  # an SAE is small: always at full size
        res = compile_step(cfg, sae_cfg)
        print(f"compiled one step at batch {cfg.batch_size} in {res['compile_s']:.1f} s: temp "
              f"memory {res['temp_bytes'] / 2**30:.2f} GiB, arguments "
              f"{res['argument_bytes'] / 2**30:.2f} GiB")
    return 0


def _load_glp(run, step):
    """glp_jax.load, refusing SAE runs (sampling and export are GLP operations)."""
    from glp_jax.api import LoadedGLP, load

    loaded = load(run, step=step)
    if not isinstance(loaded, LoadedGLP):
        raise GLPError(f"{run} is an SAE run; this command needs a GLP run (use `glp eval "
                       f"recon|fd|delta-lm` to evaluate the SAE)")
    return loaded


def cmd_export(args) -> int:
    from glp_jax.interop.original_ckpt import export_original

    glp = _load_glp(args.run, args.step)
    export_original(glp.model, glp.normalizer, args.out)
    print(f"exported {glp.source} (step {glp.step}) to {args.out} in the original layout")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(x)) for x in text.replace(",", " ").split())
    except ValueError as e:
        raise GLPError(f"expected a list of numbers, got {text!r}") from e


def cmd_sweep(args) -> int:
    from glp_jax.sweep import SweepPlan, run_local_sweep

    plan = SweepPlan(_ints(args.depths), _ints(args.budgets), _ints(args.seeds))
    dirs = run_local_sweep(args.overrides, plan, args.root)
    print(f"{len(dirs)} runs in {args.root}")
    return 0


def cmd_fit(args) -> int:
    from glp_jax.scaling import fit_sweep, results_markdown, write_results

    result = fit_sweep(args.sweep_dir, final_only=args.final_only, n_boot=args.n_boot,
                       loss_column=args.loss_column)
    json_path, md_path = write_results(args.sweep_dir, result)
    print(results_markdown(result))
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def cmd_plot(args) -> int:
    from glp_jax.plots import plot_sweep
    from glp_jax.scaling import RESULTS_JSON, fit_sweep, load_runs, read_results, write_results

    out = Path(args.sweep_dir)
    if (out / RESULTS_JSON).exists() and not args.refit:
        result = read_results(out)
    else:
        result = fit_sweep(out, final_only=args.final_only, n_boot=args.n_boot)
        write_results(out, result)
    paths = plot_sweep(load_runs(out), result, Path(args.out or out / "plots"))
    for p in paths:
        print(p)
    return 0


def cmd_demo(args) -> int:
    from glp_jax.demo import run_demo

    return run_demo()


def cmd_reproduce(args) -> int:
    from glp_jax.reproduce.plan import load_plan

    plan = load_plan(args.overrides)
    if args.report_only:
        from glp_jax.reproduce.report import write_report

        print(write_report(Path(plan.root), Path(plan.report_dir), seed=plan.seed))
        return 0
    from glp_jax.reproduce.run import run_reproduce

    print(run_reproduce(plan))
    return 0


def _eval_out(args) -> Path:
    return Path(args.out) if args.out else Path(args.targets[0]) / "evals"


def cmd_eval_fd(args) -> int:
    from glp_jax.evals.tables import fd_table

    out = _eval_out(args)
    res = fd_table(args.targets, n=args.n, steps=args.steps, steps_list=_ints(args.steps_list),
                   seed=args.seed, pca_k=args.pca_k, batch_size=args.batch_size, out_dir=out,
                   progress=not args.quiet, reference=args.reference,
                   train_store=args.train_store, val_store=args.val_store,
                   **({} if args.replicates is None else {"replicates": args.replicates}))
    key = "fd_inf" if res["replicates"] else "fd"
    best = min(res["rows"], key=lambda x: x[key]) if res["rows"] else None
    lower = res["fd_lower_bound_inf"] if key == "fd_inf" else res["fd_lower_bound"]
    print(f"{key} lower bound {lower:.4g}"
          + (f"; best {best['method']}: {best[key]:.4g}" if best else "")
          + f" -> {out / 'table1.md'}")
    return 0


def cmd_eval_delta_lm(args) -> int:
    from glp_jax.evals.delta_lm import summarize_delta_lm
    from glp_jax.evals.tables import delta_lm_table

    out = _eval_out(args)
    res = delta_lm_table(args.targets, n_seqs=args.n_seqs, length=args.length,
                         pca_k=args.pca_k, seed=args.seed, sigma0=args.sigma0,
                         steps=args.proj_steps, convention=args.convention,
                         batch_size=args.batch_size, out_dir=out, progress=not args.quiet)
    print(summarize_delta_lm(res) + f" -> {out / 'table2.md'}")
    return 0


def cmd_eval_recon(args) -> int:
    from glp_jax.evals.tables import recon_table

    out = _eval_out(args)
    res = recon_table(args.targets, n=args.n, pca_k=args.pca_k, seed=args.seed,
                      sigma0=args.sigma0, steps=args.proj_steps, convention=args.convention,
                      out_dir=out, reference=args.reference, train_store=args.train_store,
                      val_store=args.val_store)
    print(", ".join(f"{k}: explained variance {m['explained_variance']:.4f}"
                    for k, m in res["methods"].items()) + f" -> {out / 'recon.md'}")
    return 0


def cmd_eval_probe(args) -> int:
    from glp_jax.evals.probe import probe_run

    out = _eval_out(args)
    res = probe_run(args.targets[0], baselines=args.targets[1:], tasks=args.tasks or None,
                    sigma=args.sigma, seed=args.seed, max_tasks=args.max_tasks,
                    max_per_task=args.max_per_task, out_dir=out, progress=not args.quiet,
                    dense=not args.no_dense, pca_k=args.pca_k, max_length=args.max_length)
    print(", ".join(f"{m}: 1-D AUC {v['mean']:.3f}" for m, v in res["auc_1d"].items()
                    if v and v.get("mean") is not None) + f" -> {out / 'probe.md'}")
    return 0


def cmd_eval_steer(args) -> int:
    from glp_jax.evals.steer import steer_run, summarize_steer

    out = _eval_out(args)
    # only what the user set: the library owns the defaults
    extra = {k: v for k, v in (("norm", args.norm), ("saturation", args.saturation),
                               ("fluency_floor", args.fluency_floor),
                               ("continuations", args.continuations)) if v is not None}
    if args.calibration_rs is not None:
        extra["calibration_rs"] = _floats(args.calibration_rs)
    if args.rs is not None:
        extra["rs"] = _floats(args.rs)
    if args.calibrate:
        extra.setdefault("norm", "diffmean")
    res = steer_run(args.targets[0], baselines=args.targets[1:],
                    n_prompts=args.n_prompts, max_new_tokens=args.max_new_tokens,
                    sigma0=args.sigma0, steps=args.proj_steps, convention=args.convention,
                    seed=args.seed, pos=args.pos, neg=args.neg, prompts=args.prompts,
                    out_dir=out, progress=not args.quiet, calibrate=args.calibrate,
                    negative=args.negative, **extra)
    print(summarize_steer(res) + f" -> {out / 'steer.md'}")
    return 0


def cmd_eval_neuron(args) -> int:
    from glp_jax.evals.neuron import top_activating

    out = _eval_out(args)
    _, md = top_activating(args.targets[0], args.block, args.unit, n_docs=args.n_docs,
                           top=args.top, sigma=args.sigma, seed=args.seed, out_dir=out,
                           progress=not args.quiet)
    print(md)
    return 0


def cmd_eval_utility(args) -> int:
    from glp_jax.evals.utility import utility_over_checkpoints

    res = utility_over_checkpoints(args.targets, probe=not args.no_probe, steer=args.steer,
                                   which=args.which, sigma=args.sigma, seed=args.seed,
                                   max_tasks=args.max_tasks, max_per_task=args.max_per_task,
                                   progress=not args.quiet)
    n = sum(len(v) for v in res.values())
    print(f"{n} checkpoints of {len(res)} runs evaluated; columns added to each run's "
          f"metrics.jsonl: run `glp fit` and `glp plot` on the sweep to fit and draw them")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError as e:
        raise GLPError(f"expected a list of numbers, got {text!r}") from e


def cmd_pca(args) -> int:
    from glp_jax.data.store import ActivationStore
    from glp_jax.pca import fit_pca

    store = ActivationStore.open(args.store)
    pca = fit_pca(store, layer=args.layer, max_rows=args.max_rows, progress=not args.quiet)
    pca.save(args.out)
    print(f"PCA of {pca.info['rows']:,} rows x d={pca.d} -> {args.out}; explained variance "
          f"k=8 {pca.explained_variance_ratio(8):.3f}, k=32 {pca.explained_variance_ratio(32):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from glp_jax.config import STORE_DTYPES, TOKEN_POLICIES, ExtractConfig

    p = _Parser(prog="glp", description="Generative meta-models of LLM activations")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("extract", help="extract residual-stream activations into a store")
    xd = ExtractConfig()  # the one place extraction defaults live
    e.add_argument("--model", default=xd.model, help="HF id, local dir, or smollm2 (embedded)")
    e.add_argument("--layers", default="middle", help="e.g. 14 or 3,7,14 or middle or all")
    e.add_argument("--corpus", default=xd.corpus, help="fortune, a .txt/.jsonl/.parquet, hf:NAME")
    e.add_argument("--split", default=xd.split, choices=["train", "val", "all"])
    e.add_argument("--val-docs", type=int, default=xd.val_docs,
                   help="held-out documents (default min(10000, 10%% of the corpus))")
    e.add_argument("--max-tokens", type=int, required=True, help="rows to store in total")
    e.add_argument("--out", required=True, help="store path or kvstore URL")
    e.add_argument("--policy", default=xd.token_policy, choices=list(TOKEN_POLICIES))
    e.add_argument("--tokens-per-doc", type=int, default=xd.tokens_per_doc, help="k for --policy k")
    e.add_argument("--max-length", type=int, default=xd.max_length)
    e.add_argument("--seed", type=int, default=xd.seed, help="document permutation and policy seed")
    e.add_argument("--dtype", default=xd.dtype, choices=list(STORE_DTYPES), help="storage dtype")
    e.add_argument("--llm-dtype", default=xd.llm_dtype, choices=["float32", "bfloat16"])
    e.add_argument("--device", default=xd.device)
    e.add_argument("--batch-tokens", type=int, default=xd.batch_tokens)
    e.add_argument("--window-docs", type=int, default=xd.window_docs)
    e.add_argument("--flush-rows", type=int, default=xd.flush_rows)
    e.add_argument("--worker", type=int, default=0, help="this worker's id, 0..N-1")
    e.add_argument("--workers", default="1",
                   help="N workers on disjoint documents write one logical store under --out "
                        "(`slurm`: SLURM_PROCID / SLURM_NTASKS)")
    e.add_argument("--worker-block-rows", type=int, default=16384,
                   help="rows per block in the workers' round-robin row order")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_extract)

    s = sub.add_parser("store", help="inspect or import activation stores")
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    i = ssub.add_parser("info", help="rows, d, dtype, layers, model, statistics, size")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_store_info)
    vf = ssub.add_parser("verify", help="read every chunk: report corrupt or missing shards by "
                         "layer and row range (exit 1 if any)")
    vf.add_argument("path")
    vf.add_argument("--json", action="store_true")
    vf.add_argument("--quiet", action="store_true")
    vf.set_defaults(fn=cmd_store_verify)
    imp = ssub.add_parser("import-original", help="import an original-format GLP dataset")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--model", default="unknown (imported)")
    imp.add_argument("--layer", type=int, default=-1)
    imp.add_argument("--quiet", action="store_true")
    imp.set_defaults(fn=cmd_store_import)
    t = sub.add_parser("train", help="train a GLP: config=FILE.yaml key=value ...")
    t.add_argument("overrides", nargs="*", help="config=FILE and key=value overrides")
    t.set_defaults(fn=cmd_train)

    sp = sub.add_parser("sample", help="sample activations from a trained GLP")
    sp.add_argument("run", help="run directory (ours or the original layout)")
    sp.add_argument("--n", type=positive_int, default=1000)
    sp.add_argument("--steps", type=positive_int, default=20)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--layer", type=int, default=None, help="LLM layer (multi-layer GLPs)")
    sp.add_argument("--step", default="latest", help="checkpoint: latest, a step, or epoch_N")
    sp.add_argument("--out", required=True, help=".npy file for the [n, d] samples")
    sp.set_defaults(fn=cmd_sample)

    m = sub.add_parser("model", help="model sizes")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    mi = msub.add_parser("info", help="params and FLOPs: key=value (d_input, n_layers, ...) or config=FILE")
    mi.add_argument("overrides", nargs="*")
    mi.set_defaults(fn=cmd_model_info)

    cc = sub.add_parser("config", help="configuration checks")
    ccsub = cc.add_subparsers(dest="config_cmd", required=True)
    chk = ccsub.add_parser("check", help="validate a training config (config=FILE key=value)")
    chk.add_argument("overrides", nargs="*")
    chk.add_argument("--compile", action="store_true", help="AOT-compile one step (reduced size)")
    chk.add_argument("--full", action="store_true", help="compile at full size (no allocation)")
    chk.add_argument("--shrink", type=int, default=32, help="width divisor for --compile")
    chk.add_argument("--mesh", type=_parse_mesh, action="append", default=[],
                     help="memory plan: compile the real step on data=A,fsdp=B simulated "
                     "devices (repeatable) and print per-device memory")
    chk.add_argument("--batch", type=positive_int, default=None, help="global batch to plan")
    chk.add_argument("--fit", default=None, help="with --mesh: the largest micro-batch "
                     "(accumulation, then remat) that fits this device: h100, h200, v5e, v5p, "
                     "v6e, or a number of bytes")
    chk.add_argument("--json", action="store_true", help="with --mesh: JSON for programs")
    chk.set_defaults(fn=cmd_config_check)

    ex = sub.add_parser("export", help="export a run to the original release's layout")
    ex.add_argument("run")
    ex.add_argument("--out", required=True)
    ex.add_argument("--step", default="latest")
    ex.set_defaults(fn=cmd_export)

    sw = sub.add_parser("sweep", help="run a depths x budgets x seeds sweep locally")
    sw.add_argument("overrides", nargs="*", help="config=FILE key=value (base of every run)")
    sw.add_argument("--depths", default="1 2 4")
    sw.add_argument("--budgets", required=True, help="activations per run, e.g. '1e5 4e5'")
    sw.add_argument("--seeds", default="0")
    sw.add_argument("--root", required=True, help="sweep directory (one folder per run)")
    sw.set_defaults(fn=cmd_sweep)

    ft = sub.add_parser("fit", help="fit L(C) = E + A C^-alpha (and downstream metrics) to a sweep")
    ft.add_argument("sweep_dir")
    ft.add_argument("--final-only", action="store_true", help="one run per budget: final points")
    ft.add_argument("--n-boot", type=int, default=1000)
    ft.add_argument("--loss-column", default=None, help="default val_loss if logged, else loss")
    ft.set_defaults(fn=cmd_fit)

    pl = sub.add_parser("plot", help="PNG plots of a sweep (loss vs compute, frontier, metrics)")
    pl.add_argument("sweep_dir")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default SWEEP/plots)")
    pl.add_argument("--refit", action="store_true")
    pl.add_argument("--final-only", action="store_true")
    pl.add_argument("--n-boot", type=int, default=1000)
    pl.set_defaults(fn=cmd_plot)

    ev = sub.add_parser("eval", help="evaluate runs, sweeps and baselines (Tables 1-2)")
    evsub = ev.add_subparsers(dest="eval_cmd", required=True)
    targets_help = ("GLP runs, sweep folders (every run below), SAE runs, PCA folders "
                    "(`glp pca`); the first one's evals/ is the default --out")
    efd = evsub.add_parser("fd", help="Frechet distance to held-out activations (Table 1)")
    edl = evsub.add_parser("delta-lm", help="increase of LM loss when the layer is "
                           "replaced by its reconstruction (Table 2)")
    erc = evsub.add_parser("recon", help="reconstruction metrics (NMSE, explained variance)")
    for q in (efd, edl, erc):
        q.add_argument("targets", nargs="+", help=targets_help)
        q.add_argument("--out", default=None, help="folder for the table (JSON + Markdown)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--pca-k", type=int, default=32, help="PCA components (default: the "
                       "SAE's k, the same number of active dimensions)")
        q.add_argument("--quiet", action="store_true")
    for q in (efd, erc):
        q.add_argument("--train-store", default=None, help="with --val-store: the stores to "
                       "compare against (default: the first run's; needed for original-format "
                       "GLP folders, which name none)")
        q.add_argument("--val-store", default=None)
        q.add_argument("--reference", default="per-doc", choices=["per-doc", "random"],
                       help="held-out rows: one token per document (the paper's) or random "
                       "rows (stores that cover few documents)")
    for q in (edl, erc):
        q.add_argument("--sigma0", type=float, default=0.5, help="GLP projection noise level")
        q.add_argument("--proj-steps", type=int, default=20, help="GLP projection grid size")
        q.add_argument("--convention", default="code", choices=["code", "paper"])
    efd.add_argument("--n", type=positive_int, default=50_000, help="samples and reference rows")
    efd.add_argument("--steps", type=positive_int, default=1000, help="Euler steps of the headline FD")
    efd.add_argument("--steps-list", default="1,2,4,10,20,50,100,250,1000")
    efd.add_argument("--batch-size", type=int, default=4096)
    efd.add_argument("--replicates", type=int, default=None,
                     help="disjoint replicate sets for the interval of the bias-corrected "
                     "FD_inf (>= 2; 0: raw FD only; default: evals.frechet.REPLICATES)")
    efd.set_defaults(fn=cmd_eval_fd)
    edl.add_argument("--n-seqs", type=positive_int, default=2048)
    edl.add_argument("--length", type=positive_int, default=128)
    edl.add_argument("--batch-size", type=int, default=8)
    edl.set_defaults(fn=cmd_eval_delta_lm)
    erc.add_argument("--n", type=positive_int, default=50_000, help="held-out rows")
    erc.set_defaults(fn=cmd_eval_recon)

    epr = evsub.add_parser("probe", help="1-D and dense probing: GLP meta-neurons vs raw, "
                           "MLP neurons, SAE latents, PCA (Table 4)")
    est = evsub.add_parser("steer", help="on-manifold sentiment steering: concept vs fluency "
                           "per method and r (Figure 5)")
    ene = evsub.add_parser("neuron", help="top-activating held-out texts of one meta-neuron")
    for q in (epr, est, ene):
        q.add_argument("targets", nargs="+", help="a GLP run, then baselines (SAE runs, PCA "
                       "folders); its evals/ is the default --out")
        q.add_argument("--out", default=None)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--quiet", action="store_true")
    for q in (epr, ene):
        q.add_argument("--sigma", type=float, default=0.1, help="meta-neuron noise level "
                       "(0.1 for comparisons, 0.5 for scaling)")
    epr.add_argument("--tasks", nargs="*", default=None, help=".csv/.jsonl (text,label) files "
                     "or original-layout task folders (default: the fortune category suite)")
    epr.add_argument("--max-tasks", type=positive_int, default=None)
    epr.add_argument("--max-per-task", type=positive_int, default=None)
    epr.add_argument("--max-length", type=int, default=512)
    epr.add_argument("--pca-k", type=int, default=32)
    epr.add_argument("--no-dense", action="store_true", help="skip the dense probes")
    epr.set_defaults(fn=cmd_eval_probe)
    est.add_argument("--rs", default=None,
                     help="coefficients, r x the --norm unit (default 0.2,0.4,...,2.0); with "
                     "--calibrate the grid's shape, its 2.0 landing on DiffMean's saturation")
    est.add_argument("--norm", default=None, choices=["mean", "centred", "diffmean"],
                     help="unit of r: mean activation norm (the spec; default), centred "
                     "norm, or the DiffMean vector's norm (default with --calibrate)")
    est.add_argument("--calibrate", action="store_true",
                     help="choose the r range per model: search DiffMean's concept "
                     "saturation (evals/steer.py calibrate_steering) and rescale --rs onto it")
    est.add_argument("--calibration-rs", default=None,
                     help="the search grid, in DiffMean norms (default 0.5,1,...,32)")
    est.add_argument("--saturation", type=float, default=None,
                     help="r_sat = the smallest r reaching this fraction of DiffMean's best "
                     "concept gain (default 0.9)")
    est.add_argument("--fluency-floor", type=float, default=None,
                     help="the search counts only r where DiffMean's fluency is >= this x the "
                     "unsteered model's (default 0.5)")
    est.add_argument("--continuations", default=None,
                     help="real continuations of --prompts, one per prompt (the fluency "
                     "judge's anchor; default: held-out fortunes)")
    est.add_argument("--negative", action="store_true", help="also the negative task")
    est.add_argument("--n-prompts", type=positive_int, default=100)
    est.add_argument("--max-new-tokens", type=int, default=20)
    est.add_argument("--sigma0", type=float, default=0.5)
    est.add_argument("--proj-steps", type=int, default=20)
    est.add_argument("--convention", default="code", choices=["code", "paper"])
    est.add_argument("--pos", default=None, help="positive texts (.txt one per line, .jsonl)")
    est.add_argument("--neg", default=None, help="negative texts")
    est.add_argument("--prompts", default=None, help="neutral prompts")
    est.set_defaults(fn=cmd_eval_steer)
    ene.add_argument("--block", type=int, required=True)
    ene.add_argument("--unit", type=int, required=True)
    ene.add_argument("--n-docs", type=int, default=1024)
    ene.add_argument("--top", type=int, default=20)
    ene.set_defaults(fn=cmd_eval_neuron)

    eut = evsub.add_parser("utility", help="probing (and steering) at every checkpoint of a "
                           "sweep, added to metrics.jsonl for `glp fit` (utility vs compute)")
    eut.add_argument("targets", nargs="+", help="sweep folders or GLP runs")
    eut.add_argument("--which", default="all", choices=["all", "last"], help="checkpoints")
    eut.add_argument("--sigma", type=float, default=0.5, help="meta-neuron noise (paper: 0.5)")
    eut.add_argument("--steer", action="store_true", help="also the steering score")
    eut.add_argument("--no-probe", action="store_true")
    eut.add_argument("--max-tasks", type=positive_int, default=4)
    eut.add_argument("--max-per-task", type=positive_int, default=300)
    eut.add_argument("--seed", type=int, default=0)
    eut.add_argument("--quiet", action="store_true")
    eut.set_defaults(fn=cmd_eval_utility)

    pc = sub.add_parser("pca", help="fit the PCA baseline on a store (float64, streamed)")
    pc.add_argument("store")
    pc.add_argument("--out", required=True)
    pc.add_argument("--layer", type=int, default=None)
    pc.add_argument("--max-rows", type=int, default=None)
    pc.add_argument("--quiet", action="store_true")
    pc.set_defaults(fn=cmd_pca)

    dm = sub.add_parser("demo", help="the end-to-end demo on the embedded model and corpus")
    dm.set_defaults(fn=cmd_demo)

    rp = sub.add_parser("reproduce", help="the paper's six findings end to end (resumable), "
                        "written to reports/REPORT.md")
    rp.add_argument("overrides", nargs="*", help="config=PLAN.yaml (default experiments/"
                    "reproduce/cpu.yaml) and key=value plan overrides (glp_jax/reproduce/plan.py)")
    rp.add_argument("--report-only", action="store_true",
                    help="only rewrite the report from the results already in the plan's root")
    rp.set_defaults(fn=cmd_reproduce)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (what, and where the help is), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _user_error(e: BaseException) -> GLPError | None:
    """The GLPError behind `e` (raised directly, or wrapped by grain/orbax on the way up)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, GLPError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _report_unexpected(e: Exception) -> str:
    """Save the traceback of an unexpected error to a file; return where it is."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="glp-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"glp {' '.join(sys.argv[1:])}\n")
        traceback.print_exception(e, file=f)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr and a non-zero exit: 2 for bad
    input (GLPError, unreadable files), 75 when preempted by SIGTERM/SIGINT after making
    progress durable (rerun to resume), 1 for an unexpected error, whose traceback goes to a
    file (or to the terminal with GLP_DEBUG=1)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    quiet_third_party_bars()
    try:
        return args.fn(args)
    except Preempted as e:
        print(f"glp: {_one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("glp: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become messages
        user = _user_error(e)
        if user is not None:
            print(f"glp: error: {_one_line(user)}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.strerror:
            where = f": {e.filename}" if e.filename else ""
            print(f"glp: error: {e.strerror}{where}", file=sys.stderr)
            return 2
        if os.environ.get("GLP_DEBUG"):
            raise
        print(f"glp: error: unexpected {type(e).__name__}: {_one_line(e)[:300]} (the traceback "
              f"is in {_report_unexpected(e)}; GLP_DEBUG=1 prints it; please report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
