"""Typed training configuration: YAML files + `key=value` overrides, unknown keys rejected.

Keys keep the original GLP code's names where it had them (`train_dataset`, `batch_size`,
`learning_rate`, `gradient_clipping_threshold`, `log_every_n_steps`, `save_every_n_steps`,
`output_path`, model keys `d_input`, `d_model`, `d_mlp`, `n_layers`,
`multi_layer_n_layers`). All keys are top level.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from glp_jax.data.settings import (
    BATCH_SIZE,
    BLOCK_ROWS,
    FOLLOW_TIMEOUT_S,
    STREAMS,
    WINDOW_ROWS,
    check_batch_size,
    check_mode,
    check_shuffle_mode,
)
from glp_jax.errors import ConfigError

if TYPE_CHECKING:
    from glp_jax.data.pipeline import PipelineConfig


def total_steps_of(num_steps: int | None, num_activations: int | None, batch_size: int) -> int:
    """Optimizer steps of a run: num_steps, or num_activations // batch_size (at least 1).
    Works on raw config values too (e.g. a run's config.json)."""
    if num_steps is not None:
        return int(num_steps)
    if num_activations is not None:
        return max(1, int(num_activations) // int(batch_size))  # >= 1 batch: validate()
    raise ConfigError("set num_steps or num_activations (run length)")


MODELS = ("glp", "sae")
TRACKERS = ("jsonl", "tensorboard", "wandb")


def check_trackers(names: list[str]) -> None:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker {unknown[0]!r} in trackers={names}; choose from "
                          f"{', '.join(TRACKERS)} (e.g. trackers=[jsonl,tensorboard])")


@dataclass
class TrainConfig:
    """One training run. The data keys are run-level: `pipeline_config()` translates them to
    the library-level `PipelineConfig`. Defaults differ where a run wants otherwise: one
    pass over the rows (`data_mode=single`, the original recipe) and 4 read threads."""

    # data
    train_dataset: str = ""  # store path or kvstore URL
    val_dataset: str | None = None  # held-out store for the periodic validation loss
    layers: list[int] | None = None  # store layers to train on; several = multi-layer GLP
    data_mode: str = "single"  # single (each row once) | repeat | follow (live extraction)
    follow_timeout_s: float = FOLLOW_TIMEOUT_S
    data_threads: int = 4  # grain read threads; the prefetch depth is max(2, data_threads)
    # shuffle: exact (a global index shuffle; random inner-chunk reads) | block (whole blocks read
    # contiguously and shuffled in memory windows: glp_jax/data/blocks.py, BENCHMARKS.md)
    data_shuffle: str = "exact"
    shuffle_block_rows: int = BLOCK_ROWS
    shuffle_streams: int = STREAMS  # a multiple of the process count
    shuffle_window_rows: int = WINDOW_ROWS  # memory: 2 windows x streams/process x d x 2 B
    # model (d_input defaults to the store's d; widths to 2d and 4d)
    d_input: int | None = None
    d_model: int | None = None
    d_mlp: int | None = None
    n_layers: int = 3
    multi_layer_n_layers: int | None = None
    # which model: glp (the denoiser) | sae (the TopK SAE baseline, glp_jax/sae.py)
    model: str = "glp"
    sae_width: int | None = None  # latents; None = sae_expansion * d
    sae_expansion: int = 16
    sae_k: int = 32  # non-zero latents per activation
    sae_dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    sae_aux_k: int = 0  # AuxK: dead latents reconstructing the residual (0 = off; Gao: 512)
    sae_aux_coef: float = 1 / 32
    # optimisation (the original recipe, GLP_SPEC.md section 4)
    batch_size: int = BATCH_SIZE
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.01
    initial_factor: float = 0.01
    final_factor: float = 0.1
    gradient_clipping_threshold: float = 1.0
    use_bf16: bool = True  # bf16 compute, fp32 master parameters
    remat_blocks: bool = False  # recompute blocks in backward: less memory, ~1/3 more FLOPs
    # blocks per scan iteration: 0 = all (faster step, longer compile), None = all up to
    # train.AUTO_UNROLL_MAX_BLOCKS blocks, else 1
    scan_unroll: int | None = None
    sigma_sampling: str = "discrete"  # discrete (original, 1000 levels) | continuous
    # run length: num_steps, or num_activations (steps = num_activations // batch_size)
    num_steps: int | None = None
    num_activations: int | None = None
    seed: int = 0
    stop_at_step: int | None = None  # leave (checkpointed) at this step: time-boxed jobs
    # parallelism: mesh axis sizes, -1 = fill with the remaining devices
    mesh_data: int = -1
    mesh_fsdp: int = 1
    # logging, evaluation, checkpoints
    output_path: str = "runs/glp"
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 0  # 0 = only at the end
    eval_log_points: int = 0  # also evaluate at this many log-spaced steps (scaling curves)
    eval_rows: int = 2048
    eval_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    save_every_n_steps: int = 1000
    keep_last_n: int = 2
    epoch_size: int = 1_000_000  # activations per "epoch" (log-spaced epoch_N checkpoints)
    save_epochs: str | list[int] = "log2"  # log2 = 1, 2, 4, ... epochs; or an explicit list
    async_checkpointing: bool = True
    checkpoint_digest: bool = True  # size + CRC-32 of every checkpoint file, checked on restore
    peak_flops: float | None = None  # per device, for MFU; None = not reported
    progress: bool = True
    # experiment tracking (glp_jax/tracking.py): metrics.jsonl is always written; tensorboard
    # and wandb are added beside it by process 0. run_name defaults to output_path's last
    # folder, sweep_name groups a sweep's runs (wandb group; set by glp sweep / launch/sweep.sh).
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    run_name: str | None = None
    sweep_name: str | None = None
    wandb_project: str = "glp_jax"
    wandb_entity: str | None = None
    # preemption: with several processes, the stop flag of a SIGTERM/SIGINT is agreed every
    # this many steps (one tiny all-gather); one process checks it every step for free
    preempt_check_every_n_steps: int = 10

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_batch_size(self.batch_size)
        if self.scan_unroll is not None and self.scan_unroll < 0:
            raise ConfigError(f"scan_unroll={self.scan_unroll}: give the blocks per scan "
                              "iteration (1 = a plain scan, 0 = every block unrolled)")
        if self.gradient_accumulation_steps <= 0:
            raise ConfigError(f"gradient_accumulation_steps must be positive, got "
                              f"{self.gradient_accumulation_steps}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ConfigError(f"batch_size {self.batch_size} must be divisible by "
                              f"gradient_accumulation_steps {self.gradient_accumulation_steps}")
        check_mode(self.data_mode, "data_mode")
        check_shuffle_mode(self.data_shuffle, "data_shuffle")
        if self.sigma_sampling not in ("discrete", "continuous"):
            raise ConfigError(f"sigma_sampling must be discrete or continuous, got {self.sigma_sampling!r}")
        if self.model not in MODELS:
            raise ConfigError(f"model must be one of {MODELS} (glp: the denoiser, sae: the TopK "
                              f"SAE baseline), got {self.model!r}")
        for name in ("sae_expansion", "sae_k", "sae_dead_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sae_width is not None and self.sae_width < self.sae_k:
            raise ConfigError(f"sae_width={self.sae_width} must be >= sae_k={self.sae_k}")
        if self.sae_aux_k < 0 or self.sae_aux_coef < 0:
            raise ConfigError(f"sae_aux_k and sae_aux_coef must be >= 0, got {self.sae_aux_k}, "
                              f"{self.sae_aux_coef}")
        if self.n_layers <= 0:
            raise ConfigError(f"n_layers must be positive, got {self.n_layers}")
        check_trackers(self.trackers)
        for name in ("log_every_n_steps", "save_every_n_steps", "preempt_check_every_n_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.num_steps is not None and self.num_activations is not None:
            raise ConfigError("give num_steps or num_activations, not both")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"num_steps={self.num_steps} trains nothing; give at least 1 step "
                              f"(or num_activations >= batch_size)")
        if self.num_activations is not None and self.num_activations < self.batch_size:
            raise ConfigError(f"num_activations={self.num_activations} is less than one batch of "
                              f"batch_size={self.batch_size}; give at least {self.batch_size} "
                              f"activations (or num_steps >= 1)")

    @property
    def total_steps(self) -> int:
        return total_steps_of(self.num_steps, self.num_activations, self.batch_size)

    def pipeline_config(self) -> PipelineConfig:
        """The training data pipeline of this run (the one TrainConfig -> PipelineConfig)."""
        from glp_jax.data.pipeline import PipelineConfig  # grain: only when training

        return PipelineConfig(
            store=self.train_dataset, layers=self.layers, batch_size=self.batch_size,
            seed=self.seed, mode=self.data_mode, num_threads=self.data_threads,
            prefetch=max(2, self.data_threads), follow_timeout_s=self.follow_timeout_s,
            shuffle_mode=self.data_shuffle, block_rows=self.shuffle_block_rows,
            streams=self.shuffle_streams, window_rows=self.shuffle_window_rows)

    def epoch_checkpoints(self) -> list[int]:
        """Steps at which epoch_N checkpoints are kept (N in units of epoch_size activations)."""
        total_acts = self.total_steps * self.batch_size
        if self.save_epochs == "log2":
            epochs, e = [], 1
            while e * self.epoch_size <= total_acts:
                epochs.append(e)
                e *= 2
        elif isinstance(self.save_epochs, list):
            epochs = [int(e) for e in self.save_epochs]
        else:
            raise ConfigError(f"save_epochs must be 'log2' or a list of ints, got {self.save_epochs!r}")
        return epochs

    def eval_steps(self) -> set[int]:
        """Steps with a validation loss: every eval_every_n_steps, log-spaced points, the end."""
        total = self.total_steps
        steps = {total}
        if self.eval_every_n_steps:
            steps |= set(range(self.eval_every_n_steps, total + 1, self.eval_every_n_steps))
        if self.eval_log_points:
            first = max(1, total // 100)
            pts = np.geomspace(first, total, self.eval_log_points)
            steps |= {int(round(p)) for p in pts}
        return steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def middle_layer(n_layers: int) -> int:
    """The original's "middlemost" layer: n_layers//2 - 1 (7 for Llama-1B, 14 for SmolLM2)."""
    return n_layers // 2 - 1


TOKEN_POLICIES = ("all", "last", "k")
STORE_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class ExtractConfig:
    """What an extraction computes and stores; built once (CLI, demo, scripts) and handed to
    `extraction_meta`, `Extractor` and `extract_to_store`, so they cannot disagree."""

    model: str = "smollm2"  # HF id, local dir, or smollm2 (embedded)
    layers: list[int] | None = None  # decoder layers; None = the middle layer
    corpus: str = "fortune"
    split: str = "train"  # train | val | all
    val_docs: int | None = None  # held-out documents (None: min(10000, 10% of the corpus))
    seed: int = 42  # document permutation and per-document token choice (policy k)
    token_policy: str = "all"  # all | last | k
    tokens_per_doc: int = 0  # k for policy k
    max_length: int = 2048
    dtype: str = "bfloat16"  # storage dtype
    llm_dtype: str = "float32"
    device: str = "cpu"
    batch_tokens: int = 8192
    window_docs: int = 64  # documents per deterministic window (resume granularity)
    flush_rows: int = 8192  # rows buffered before a commit

    def __post_init__(self):
        if self.token_policy not in TOKEN_POLICIES:
            raise ConfigError(f"unknown token policy {self.token_policy!r}; use one of "
                              f"{TOKEN_POLICIES}")
        if self.token_policy == "k" and self.tokens_per_doc <= 0:
            raise ConfigError("token policy 'k' needs tokens_per_doc > 0")
        if self.split not in ("train", "val", "all"):
            raise ConfigError(f"split must be train, val or all, got {self.split!r}")
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length}")

    def for_model(self, n_layers: int) -> ExtractConfig:
        """Layers resolved (None -> middle) and checked against the LLM's decoder layers."""
        layers = [middle_layer(n_layers)] if self.layers is None else sorted(int(k) for k in self.layers)
        for k in layers:
            if not 0 <= k < n_layers:
                raise ConfigError(f"layer {k} is out of range for {self.model} with {n_layers} "
                                  f"decoder layers (valid: 0..{n_layers - 1})")
        return dataclasses.replace(self, layers=layers)


def _number(name: str, value: Any, kind: str):
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if kind == "float":
        return float(value)
    if float(value) != int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type.

    Command-line values arrive as strings; YAML 1.1 reads `1e-4` as a string too, so
    numbers are parsed by the field's type, not by YAML."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~", ""):
        value = None
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{name} cannot be null")
    list_kind = next((k for k in kinds if k.startswith("list[")), None)
    if isinstance(value, str) and (list_kind or "bool" in kinds) and "str" not in kinds[:1]:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, list | bool) or (list_kind and "str" not in kinds):
            value = parsed
    elif isinstance(value, str) and list_kind and value.strip().startswith("["):
        value = yaml.safe_load(value)
    if list_kind and (isinstance(value, list) or "str" not in kinds):
        elem = list_kind[5:-1]
        items = value if isinstance(value, list) else [value]
        if elem == "str":
            return [str(v) for v in items]
        return [_number(name, v, elem) for v in items]
    if "bool" in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if "int" in kinds or "float" in kinds:
        return _number(name, value, "int" if "int" in kinds else "float")
    if "str" in kinds:
        return str(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["config=x.yaml", "batch_size=64"]` -> {"config": ..., "batch_size": "64"}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def make_config(values: dict[str, Any], cls=TrainConfig):
    """Build a config from a dict (YAML or overrides); unknown keys get a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = sys.modules[cls.__module__].__file__ or cls.__module__
            where = where[where.rfind("glp_jax"):] if "glp_jax" in where else where
            raise ConfigError(f"unknown {cls.__name__} key {k!r}{hint} (the keys are the fields "
                              f"of {cls.__name__} in {where})")
        kwargs[k] = _coerce(k, v, fields[k].type)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(str(e)) from e


ENV_DEFAULTS = {"GLP_DATA_ROOT": "data", "GLP_RUN_ROOT": "runs"}


def expand_env(value: Any) -> Any:
    """`${VAR}` in string values from the environment (GLP_DATA_ROOT, GLP_RUN_ROOT default
    to data/ and runs/), so one YAML serves a laptop and a bucket."""
    if isinstance(value, str) and "$" in value:
        for k, v in ENV_DEFAULTS.items():
            value = value.replace("${" + k + "}", os.environ.get(k, v))
        value = os.path.expandvars(value)
    elif isinstance(value, list):
        value = [expand_env(v) for v in value]
    return value


SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (source or editable install)


def find_config_file(path: str | Path) -> Path:
    """`config=PATH`: as given (absolute or relative to the working directory), else under
    $GLP_CONFIG_DIR, else under the source checkout (so `config=experiments/cpu/sweep.yaml`
    works from any directory with an editable install)."""
    given = Path(path)
    candidates = [given]
    if not given.is_absolute():
        if os.environ.get("GLP_CONFIG_DIR"):
            candidates.append(Path(os.environ["GLP_CONFIG_DIR"]) / given)
        candidates.append(SOURCE_ROOT / given)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file {path} not found (looked in: "
                      f"{', '.join(str(c) for c in candidates)}); pass an existing YAML path or "
                      f"set GLP_CONFIG_DIR to the folder holding experiments/")


def load_config(items: list[str], cls=TrainConfig):
    """`config=FILE.yaml` (optional, first) plus `key=value` overrides."""
    over = parse_overrides(items)
    values: dict[str, Any] = {}
    if "config" in over:
        from glp_jax.yamlio import error_line, safe_load

        path = find_config_file(over.pop("config"))
        try:
            loaded = safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({error_line(e)}); fix the syntax "
                              f"there") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        values.update(loaded)
    values.update(over)
    return make_config({k: expand_env(v) for k, v in values.items()}, cls)
