"""orbax checkpoints of a training run.

One manager, `checkpoints/<step>/` under the run directory, each step holding params,
optimizer state, data-iterator state and the resolved config (the RNG is the seed folded
with the step). Preservation keeps the last N steps (for resuming) plus the original's
log-spaced "epoch" steps forever (`epoch` recorded in the saved config). One manager, not
two: two async managers of one multi-process run deadlocked on orbax's barriers.
Saves are atomic (orbax writes a temporary folder and renames it when complete; in a bucket,
which cannot rename, it writes the step in place and adds commit_success.txt last), so a run
killed mid-save restores from the previous complete checkpoint. Restores always go through
a sharded abstract target, so a checkpoint saved on N devices restores on M.

Integrity: once a save is finalized, process 0 writes `<step>/glp_digest.json` (size and
CRC-32 of every file of the step; `checkpoint_digest=false` turns it off). Every restore
first checks the step against it: a missing, truncated or altered file, or an orbax error,
is a one-line `CheckpointCorruptError`. A step without a digest (older runs, a run killed
between save and digest) is unverified and trusted if orbax restores it.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp

from glp_jax.errors import CheckpointCorruptError, CheckpointError, GLPError, warn

ITEMS = ("state", "data", "config")
DIGEST_FILE = "glp_digest.json"
CORRUPT_DIR = "checkpoints_corrupt"  # corrupt steps are moved here on resume, never deleted
_CHUNK = 8 << 20


def run_path(path: str | Path) -> epath.Path:
    """Local paths made absolute; gs:// and other URLs kept as they are (etils epath)."""
    if "://" in str(path):
        from glp_jax.buckets import check_bucket
        from glp_jax.kv import apply_endpoint_env

        check_bucket(str(path))
        apply_endpoint_env()
        quiet_bucket_clients()
        return epath.Path(str(path))
    return epath.Path(Path(str(path)).absolute())


def quiet_bucket_clients() -> None:
    """gcsfs warns on every bucket access it cannot classify (no hierarchical-namespace
    lookup without Google credentials, e.g. against an emulator): keep its errors only."""
    logging.getLogger("gcsfs").setLevel(logging.ERROR)


def orbax_atomicity(directory: str) -> ocp.options.AtomicityOptions | None:
    """Buckets cannot rename a folder: orbax writes a step in place and marks it complete
    with commit_success.txt (its default on gs://; chosen here for s3:// too, where a
    rename would be a non-atomic copy). Local folders keep orbax's atomic rename."""
    if "://" not in str(directory):
        return None
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def teach_orbax_s3() -> None:
    """orbax 0.12 builds tensorstore specs for local paths and gs:// only (an s3:// path
    is refused as not absolute): give its spec builder our s3 spec (glp_jax.kv.s3_spec,
    with the endpoint and credentials from the environment). Idempotent."""
    try:
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

        if getattr(tsu, "_glp_s3", False):
            return
        use_gcs, normalize = tsu._use_gcs_driver, tsu._normalize_path
        gcs_spec = gcs_utils.get_kvstore_for_gcs
    except (ImportError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoints in s3:// need orbax-checkpoint internals that orbax "
            f"{ocp.__version__} does not have ({e}); install the version in requirements.txt "
            "(checked: 0.12.8) or keep output_path on gs:// or a local disk") from e

    from glp_jax.kv import s3_spec

    def to_url(path: str) -> str:
        return "s3://" + str(path).removeprefix("s3://").removeprefix("s3:/")

    def spec_for(path: str) -> dict:
        if str(path).startswith("s3:/"):
            spec = s3_spec(to_url(path))
            return {**spec, "path": spec["path"].rstrip("/")}
        return gcs_spec(path)

    tsu._use_gcs_driver = lambda d: str(d).startswith("s3:/") or use_gcs(d)
    tsu._normalize_path = lambda p: to_url(normalize(p)) if str(p).startswith("s3:/") else normalize(p)
    tsu.gcs_utils = _GcsUtilsWithS3(gcs_utils, spec_for)
    tsu._glp_s3 = True


class _GcsUtilsWithS3:
    """orbax's gcs_utils module as tensorstore_utils sees it, with S3 specs added."""

    def __init__(self, module, spec_for):
        self._module, self.get_kvstore_for_gcs = module, spec_for

    def __getattr__(self, name):
        return getattr(self._module, name)


# ----------------------------------------------------------------------------- digests
def file_crc32(path: epath.Path) -> tuple[int, int]:
    """(size in bytes, zlib CRC-32) of one file, read in 8 MiB chunks."""
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def step_files(step_dir: epath.Path) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the files of one step, digest excluded."""
    out = []
    for root, _, files in walk_files(step_dir):
        rel = str(root)[len(str(step_dir)):].strip("/")
        out += [f"{rel}/{f}" if rel else f for f in files]
    return sorted(f for f in out if f != DIGEST_FILE)


def walk_files(top: epath.Path):
    """epath's walk, except on buckets, where etils passes s3fs an argument it refuses
    (max_depth): list folder by folder there."""
    if "://" not in str(top):
        yield from top.walk()
        return
    dirs, files = [], []
    for child in top.iterdir():
        (dirs if child.is_dir() else files).append(child.name)
    yield str(top), dirs, files
    for d in dirs:
        yield from walk_files(top / d)


def compute_digest(step_dir: epath.Path) -> dict:
    files = {}
    for rel in step_files(step_dir):
        size, crc = file_crc32(step_dir / rel)
        files[rel] = {"size": size, "crc32": crc}
    return {"format": "glp_digest/1", "algorithm": "crc32", "files": files}


def write_digest(step_dir: epath.Path) -> None:
    from glp_jax.rundir import write_atomic  # rundir imports this module lazily

    write_atomic(step_dir / DIGEST_FILE, json.dumps(compute_digest(step_dir), indent=1))


def digest_problem(step_dir: epath.Path) -> str | None:
    """What is wrong with a step by its digest (first bad file; one line), None if intact.
    Raises FileNotFoundError when the step has no digest."""
    try:
        files = json.loads((step_dir / DIGEST_FILE).read_text())["files"]
        items = sorted((str(k), int(v["size"]), int(v["crc32"])) for k, v in files.items())
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{DIGEST_FILE} is unreadable: {e.__class__.__name__}"
    for rel, size, crc in items:
        try:
            got_size, got_crc = file_crc32(step_dir / rel)
        except FileNotFoundError:
            return f"{rel} is missing"
        if got_size < size:
            return f"{rel} is truncated to {got_size} of {size} bytes"
        if got_size != size:
            return f"{rel} has {got_size} bytes instead of {size}"
        if got_crc != crc:
            return f"{rel} is altered: CRC-32 {got_crc:08x} instead of {crc:08x}"
    return None


def _silence_failed_restore_noise() -> None:
    """After a failed orbax restore, the reads still in flight report again from other
    threads: tensorstore callbacks into the asyncio loop orbax has closed print 'Event loop
    is closed' tracebacks (sys.unraisablehook), and asyncio logs each unretrieved
    async_deserialize failure. The error itself is already raised as one line: drop exactly
    those reports; anything else reaches the old hook and the log."""
    old = sys.unraisablehook
    if getattr(old, "_glp_filter", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            old(u)

    hook._glp_filter = True
    sys.unraisablehook = hook
    log = logging.getLogger("asyncio")
    if _unretrieved_deserialize not in log.filters:
        log.addFilter(_unretrieved_deserialize)


def _unretrieved_deserialize(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of an unretrieved orbax read failure."""
    msg = str(record.msg)
    return not ("exception was never retrieved" in msg and "async_deserialize" in msg)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{e.__class__.__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


class RunCheckpoints:
    def __init__(self, run_dir: str | Path, keep_last_n: int = 2, async_save: bool = True,
                 keep_steps: Sequence[int] = (), digest: bool = True):
        self.run_dir = run_path(run_dir)
        policy = pp.AnyPreservationPolicy([pp.LatestN(n=max(1, keep_last_n)),
                                           pp.CustomSteps(list(keep_steps))])
        if str(self.run_dir).startswith("s3://"):
            teach_orbax_s3()
        opts = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                            enable_async_checkpointing=async_save,
                                            atomicity_options=orbax_atomicity(str(self.run_dir)))
        self.manager = ocp.CheckpointManager(self.run_dir / "checkpoints", item_names=ITEMS,
                                             options=opts)
        self.digest, self.async_save = digest, async_save
        self._undigested: list[int] = []  # saved, not yet digested (async saves)
        self._checked: dict[int, str | None] = {}  # step -> problem | "unverified" | None

    def step_dir(self, step: int) -> epath.Path:
        return self.manager.directory / str(step)

    def save(self, step: int, state: Any, data_state: dict, config: dict,
             epoch: int | None = None, force: bool = False) -> None:
        self._digest_finished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave({**config, "_epoch": epoch}))
        self._checked.pop(step, None)
        if self.manager.save(step, args=args, force=force) and self.digest:
            self._undigested.append(step)
            if not self.async_save:
                self._digest_finished()

    def _digest_finished(self) -> None:
        """Digest the steps whose saves have finished (process 0 writes; steps the
        preservation policy removed meanwhile are skipped)."""
        self.manager.wait_until_finished()
        pending, self._undigested = self._undigested, []
        if not pending or jax.process_index() != 0:
            return
        existing = set(self.manager.all_steps())
        for step in pending:
            if step in existing:
                try:
                    write_digest(self.step_dir(step))
                except FileNotFoundError:  # removed while being digested
                    if self.step_dir(step).exists():
                        raise

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # -- integrity
    def _problem(self, step: int) -> str | None:
        """'unverified' (no digest), a one-line problem, or None (intact); cached."""
        if step not in self._checked:
            try:
                self._checked[step] = digest_problem(self.step_dir(step))
            except FileNotFoundError:
                self._checked[step] = "unverified"
        return self._checked[step]

    def verify(self, step: int) -> bool:
        """True: the step's files match the digest written at save time. False: the step has
        no digest (unverified; trusted if orbax restores it). Raises CheckpointCorruptError
        when a file is missing, truncated or altered."""
        self._require(step)
        problem = self._problem(step)
        if problem not in (None, "unverified"):
            raise self._corrupt(step, problem)
        return problem is None

    def intact_steps(self, exclude: Sequence[int] = ()) -> list[int]:
        """Steps (newest first) that match their digest or have none (unverified)."""
        return [s for s in sorted(self.all_steps(), reverse=True)
                if s not in exclude and self._problem(s) in (None, "unverified")]

    def _corrupt(self, step: int, reason: str, suggest: bool = True,
                 verified: bool = False) -> CheckpointCorruptError:
        if suggest:
            others = self.intact_steps(exclude=[step])
            fix = (f"restore another step with --step N (glp_jax.load(run, step=N); intact: "
                   f"{others})" if others else "no other step is intact: retrain, or copy the "
                   "run folder back from a backup")
        else:
            fix = "an earlier step is tried"
        msg = f"checkpoint step {step} of {self.run_dir} is corrupt: {reason}; {fix}"
        return CheckpointCorruptError(msg, str(self.run_dir), step, reason, verified)

    def _require(self, step: int) -> None:
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no complete checkpoint at step {step} in "
                                  f"{self.manager.directory}; available: {self.all_steps()}")

    def _restore(self, step: int, args, suggest: bool):
        self._require(step)
        problem = self._problem(step)
        if problem not in (None, "unverified"):
            raise self._corrupt(step, problem, suggest)
        _silence_failed_restore_noise()  # before: the reports can precede the exception
        try:
            return self.manager.restore(step, args=args)
        except GLPError:
            raise
        except Exception as e:  # orbax / tensorstore: the first line is the cause
            reason = f"orbax cannot restore it: {_first_line(e)}"
            if problem is None:
                reason += "; yet its files match their digest: an incompatible version?"
            raise self._corrupt(step, reason, suggest, verified=problem is None) from e

    def restore(self, step: int, abstract_state: Any,
                suggest: bool = True) -> tuple[Any, dict, dict]:
        """(state, data-iterator state, config) of `step`, verified first. suggest=False
        leaves the other steps unchecked (a caller that falls back itself)."""
        out = self._restore(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()), suggest)
        return out.state, out.data, out.config

    def restore_params(self, step: int, abstract_params: Any, suggest: bool = True) -> Any:
        """Only the parameters (partial restore): sampling needs no optimizer state."""
        item = {"params": abstract_params}
        out = self._restore(step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)), suggest)
        return out.state["params"]

    def move_aside(self, step: int) -> epath.Path:
        """Move a step folder to <run>/checkpoints_corrupt/<step> (a suffix if taken)."""
        dest_dir = self.run_dir / CORRUPT_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest, i = dest_dir / str(step), 1
        while dest.exists():
            dest, i = dest_dir / f"{step}.{i}", i + 1
        src = self.step_dir(step)
        if "://" in str(src):  # object stores have no folder rename: copy, then remove
            for rel in step_files(src) + ([DIGEST_FILE] if (src / DIGEST_FILE).exists() else []):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                (src / rel).copy(dest / rel)
            src.rmtree()
        else:
            src.rename(dest)
        return dest

    def restore_newest_intact(self, abstract_state: Any,
                              move_aside: bool = True) -> tuple[int, Any | None]:
        """Resume: (step, restore(step)) of the newest restorable step, or (0, None).
        Corrupt steps newer than it are moved to checkpoints_corrupt/ (by process 0 when
        move_aside) with one warning each; a step whose files match their digest but that
        orbax cannot read is not damage: its error is raised and nothing is moved."""
        moved, found = [], (0, None)
        for step in sorted(self.all_steps(), reverse=True):
            try:
                found = (step, self.restore(step, abstract_state, suggest=False))
                break
            except CheckpointCorruptError as e:
                if e.verified:
                    raise
                dest = self.move_aside(step) if move_aside else None
                moved.append((e, dest))
        if moved:
            if jax.process_count() > 1:
                ocp.multihost.sync_global_processes(f"glp_move_aside_{moved[0][0].step}")
            self.manager.reload()
            self._checked.clear()
            then = (f"resuming from step {found[0]}" if found[0]
                    else "no intact step is left: training from scratch")
            for e, dest in moved:
                if not move_aside and jax.process_index() != 0:
                    continue  # process 0 says it
                where = f"moved it to {dest}" if dest else "left it in place"
                warn(f"checkpoint step {e.step} of {self.run_dir} is corrupt ({e.reason}); "
                     f"{where}; {then}")
        return found

    def wait(self) -> None:
        self._digest_finished()

    def close(self) -> None:
        self._digest_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
