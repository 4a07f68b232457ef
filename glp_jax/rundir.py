"""The files of one run folder, and the one place that reads or writes them.

    run.json        resolved settings (TrainConfig + GLPConfig under "glp" or SAEConfig
                    under "sae" + layers + run info)
    config.json     the TrainConfig as given
    normalizer.npz  the exact statistics the run normalises with
    metrics.jsonl   one JSON row per logged step (torn last line tolerated)
    checkpoints/    orbax steps (glp_jax.checkpoint)
    evals/          evaluation results written by glp_jax.evals (<name>.json, <name>.md)

Small files are written atomically (temp file + rename), so a reader (a follower, a
resume, `glp fit` on a live sweep) never sees half a file. Buckets have no rename and no
append, but replace one object atomically: every file there is one PUT of its whole
content, metrics.jsonl included (rewritten whole per row), so a killed writer leaves the
previous complete file, never a torn line.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from glp_jax.errors import CheckpointError, ConfigError, GLPError

RUN_FILE, CONFIG_FILE, NORMALIZER_FILE = "run.json", "config.json", "normalizer.npz"
METRICS_FILE, EVALS_DIR = "metrics.jsonl", "evals"

# A rerun into an existing folder must agree on these, or it is another run.
RESUME_KEYS = ("glp", "sae", "layers", "batch_size", "seed", "train_dataset", "data_mode",
               "sigma_sampling", "learning_rate", "num_steps", "num_activations", "data_shuffle",
               "shuffle_block_rows", "shuffle_streams", "shuffle_window_rows")
# What a run.json written before a key existed meant by it.
RESUME_DEFAULTS = {"data_shuffle": "exact"}


def write_atomic(path, data: bytes | str) -> None:
    """Write a temporary file beside `path`, then rename it over `path`: a reader never sees
    half a file, and a killed writer leaves the old file intact."""
    if isinstance(data, str):
        data = data.encode()
    if "://" in str(path):  # object stores replace whole objects anyway
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_metrics(path) -> list[dict]:
    """Rows of a metrics.jsonl merged by step (a later line for the same step adds or wins).

    A resumed run may log a step twice; the later value wins. A killed writer may leave a
    partial last line, which is skipped; a bad line elsewhere is an error.
    """
    lines = (path if hasattr(path, "read_text") else Path(path)).read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_step: dict[float, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise GLPError(f"{path}:{i + 1} is not valid JSON ({e}); repair or delete "
                           "that line") from e
        step = as_float(obj.get("step")) if isinstance(obj, dict) else math.nan
        if not np.isfinite(step):
            continue
        by_step.setdefault(step, {}).update(obj)
    return [by_step[s] for s in sorted(by_step)]


def as_float(value: Any) -> float:
    """A logged or configured value as float; NaN when missing, a bool or not a number."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def epoch_step(epoch: int, epoch_size: int, batch_size: int) -> int:
    """The step at which `epoch` (in units of epoch_size activations) is complete."""
    return int(epoch) * int(epoch_size) // int(batch_size)


BUCKET_FLUSH_S = 60.0  # a bucket's metrics.jsonl is rewritten at most this often, and at saves


class MetricsLog:
    """metrics.jsonl; on resume, rows past the restored step are dropped (they are redone).

    Local files get one appended line per row. Object stores cannot append, so the whole
    file is rewritten in one PUT (a reader or a killed writer never sees a torn file); to
    keep that from growing quadratically over a long run it happens at most every
    `flush_s` seconds and at every `flush()` (training flushes before each checkpoint, so
    every row up to the newest checkpoint is durable; later rows are redone on resume).
    """

    def __init__(self, path, resume_step: int, primary: bool, flush_s: float = BUCKET_FLUSH_S):
        self.path, self.primary, self.flush_s = path, primary, flush_s
        self.bucket = "://" in str(path)
        self.lines: list[str] = []
        self.pending, self.last_flush = 0, time.monotonic()
        if primary and path.exists():
            self.lines = [json.dumps(row) for row in read_metrics(path)
                          if row.get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in self.lines))

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        line = json.dumps(row)
        self.lines.append(line)
        if not self.bucket:
            with open(self.path, "a") as f:
                f.write(line + "\n")
            return
        self.pending += 1
        if time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Make every row written so far durable (a no-op for local files)."""
        if self.primary and self.bucket and self.pending:
            self.path.write_text("".join(ln + "\n" for ln in self.lines))
            self.pending, self.last_flush = 0, time.monotonic()


class RunDir:
    """One training run's folder (local path or bucket URL)."""

    def __init__(self, path):
        from glp_jax.checkpoint import run_path

        self.path = run_path(path)

    def __truediv__(self, name: str):
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def ensure_writable(self) -> None:
        """Create a local run folder up front, so an unusable output_path is one clear error
        before any work (buckets are checked by their first write)."""
        if "://" in str(self.path):
            return
        try:
            Path(str(self.path)).mkdir(parents=True, exist_ok=True)
            probe = Path(str(self.path)) / ".write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise GLPError(f"cannot write the run folder {self.path} ({e.strerror or e}); set "
                           f"output_path= to a folder you can write") from None

    # -- settings
    def started(self) -> bool:
        return (self.path / RUN_FILE).exists()

    def resolved(self) -> dict:
        """run.json: everything the run was started with."""
        if not self.started():
            raise CheckpointError(f"{self.path} is not a training run (no {RUN_FILE}); pass a "
                                  f"run folder written by `glp train`")
        return json.loads((self.path / RUN_FILE).read_text())

    def store_url(self, key: str = "train_dataset") -> str | None:
        """The run's `key` store (train_dataset / val_dataset; a list gives its first), found
        from any working directory: a relative path is tried as given, then against each
        folder above the run (training usually ran in one of them)."""
        url = self.resolved().get(key)
        if isinstance(url, list | tuple):
            url = url[0] if url else None
        if not url or "://" in str(url) or Path(str(url)).is_absolute() or Path(url).exists():
            return None if not url else str(url)
        if "://" not in str(self.path):
            for folder in Path(str(self.path)).parents:
                if (folder / url).exists():
                    return str(folder / url)
        return str(url)

    def write_start(self, config: dict, resolved: dict, normalizer, layers: list[int]) -> None:
        """The files of a new run: normaliser first, run.json last (it marks the start)."""
        self.path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, mean=np.asarray(normalizer.mean), var=np.asarray(normalizer.var),
                 std=np.asarray(normalizer.std), layers=np.asarray(layers))
        write_atomic(self.path / NORMALIZER_FILE, buf.getvalue())
        write_atomic(self.path / CONFIG_FILE, json.dumps(config, indent=1))
        write_atomic(self.path / RUN_FILE, json.dumps(resolved, indent=1))

    def check_resumable(self, now: dict) -> None:
        """A rerun into an existing run directory must be the same run, on the same data."""
        saved = self.resolved()
        def was(k):
            return saved.get(k, RESUME_DEFAULTS.get(k))

        keys = [k for k in RESUME_KEYS  # block-shuffle sizes matter only to block runs
                if not (k.startswith("shuffle_") and now.get("data_shuffle") != "block")]
        diffs = [f"{k}: run has {was(k)!r}, now {now.get(k)!r}" for k in keys if was(k) != now.get(k)]
        if saved.get("model", "glp") != now.get("model", "glp"):  # runs before SAEs: glp
            diffs.insert(0, f"model: run has {saved.get('model', 'glp')!r}, now {now.get('model')!r}")
        if now.get("data_mode") != "follow" and saved.get("train_rows") != now.get("train_rows"):
            diffs.append(f"train rows: the run started on {saved.get('train_rows')} rows, the "
                         f"store now holds {now.get('train_rows')} (the shuffle and the "
                         f"normaliser would change)")
        if diffs:
            raise ConfigError(f"{self.path} holds a different run; resuming it with these "
                              f"settings would not reproduce it: " + "; ".join(diffs)
                              + ". Use a new output_path, or rerun with the run's settings "
                              "(they are in run.json).")

    def normalizer(self):
        """The run's Normalizer (fp32), exactly as training used it."""
        import jax.numpy as jnp

        from glp_jax.model import Normalizer

        path = self.path / NORMALIZER_FILE
        if not path.exists():
            raise CheckpointError(f"{path} is missing; the run folder is incomplete (copy it "
                                  f"whole, or restart the run)")
        stats = np.load(io.BytesIO(path.read_bytes()))
        return Normalizer(mean=jnp.asarray(stats["mean"]), var=jnp.asarray(stats["var"]),
                          std=jnp.asarray(stats["std"]))

    # -- progress
    def metrics_log(self, resume_step: int, primary: bool) -> MetricsLog:
        return MetricsLog(self.path / METRICS_FILE, resume_step, primary)

    def metrics(self) -> list[dict]:
        path = self.path / METRICS_FILE
        return read_metrics(path) if path.exists() else []

    def add_metrics(self, rows: list[dict]) -> None:
        """Append evaluation rows ({"step": s, metric: value}); readers merge them with the
        training row of the same step, so `glp fit` sees them as downstream metrics."""
        if any("step" not in r for r in rows):
            raise GLPError("every metrics row needs a 'step'")
        path = self.path / METRICS_FILE
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):  # a torn last line (killed writer): readers skip it
            old = old[: old.rfind("\n") + 1]
        write_atomic(path, old + "".join(json.dumps(r, default=jsonable) + "\n" for r in rows))

    def total_steps(self) -> int:
        from glp_jax.config import total_steps_of

        cfg = json.loads((self.path / CONFIG_FILE).read_text())
        return total_steps_of(cfg.get("num_steps"), cfg.get("num_activations"), cfg["batch_size"])

    def finished(self) -> bool:
        """True when the run's metrics reach its configured number of steps."""
        if not ((self.path / METRICS_FILE).exists() and (self.path / CONFIG_FILE).exists()):
            return False
        rows = self.metrics()
        return bool(rows) and rows[-1].get("step") == self.total_steps()

    def step_of(self, step: int | str) -> int | None:
        """An int, 'latest' (None: ask the checkpoints), or 'epoch_N' -> a step number."""
        if step == "latest":
            return None
        try:
            if isinstance(step, str) and step.startswith("epoch_"):
                r = self.resolved()
                return epoch_step(int(step.split("_")[1]), r["epoch_size"], r["batch_size"])
            return int(step)
        except ValueError:
            raise GLPError(f"checkpoint {step!r} of {self.path}: pass a step number, 'latest' "
                           f"or 'epoch_N'") from None

    # -- evaluations
    def write_eval(self, name: str, result: dict[str, Any], markdown: str | None = None,
                   out_dir=None) -> Path:
        """evals/<name>.json (and .md): results a program reads and a person reads."""
        out = self.path / EVALS_DIR if out_dir is None else out_dir
        return write_results(out, name, result, markdown)


def write_results(out_dir, name: str, result: dict[str, Any], markdown: str | None = None):
    """<out_dir>/<name>.json (+ .md), atomically; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    write_atomic(path, json.dumps(result, indent=1, default=jsonable))
    if markdown is not None:
        write_atomic(out_dir / f"{name}.md", markdown)
    return path


def jsonable(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("latin1")
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o)} to JSON")
