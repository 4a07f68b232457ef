"""Checkpoint integrity: a digest (size + CRC-32 of every file) written at save time; a
truncated or bit-flipped newest step is named in one line, `load` falls back to the newest
intact step with a warning, an explicit step is restored exactly or refused, and a resumed
training run moves the corrupt step aside and continues from the intact one. Real tiny runs,
trained once and copied per case."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import glp_jax
from glp_jax.checkpoint import DIGEST_FILE, RunCheckpoints
from glp_jax.cli import main
from glp_jax.config import load_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import CheckpointCorruptError
from glp_jax.train import train


def _config(root: Path, run: Path, stop_at: int | None = 4, num_steps: int = 6):
    """A 6-step run (num_steps is part of a run's identity) that leaves at step 4, so a rerun
    without stop_at resumes the same run."""
    return load_config([f"train_dataset={root / 's'}", f"num_steps={num_steps}", "batch_size=16",
                        "d_model=16", "d_mlp=16", "n_layers=1", "use_bf16=false",
                        f"output_path={run}", "progress=false", "save_every_n_steps=2",
                        "log_every_n_steps=1", "keep_last_n=3", f"stop_at_step={stop_at}"])


def _flat(tree) -> dict:
    """{path: array} with paths as plain key strings (nnx State and dicts alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
            for path, v in leaves}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(store root, trained run with steps 2 and 4, params of step 2 restored by plain orbax)."""
    root = tmp_path_factory.mktemp("integrity")
    store = ActivationStore.create(root / "s", StoreMeta(model="m", layers=[0], d=8, shard_rows=64))
    x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    store.append({0: x}, np.zeros(256), np.arange(256))
    train(_config(root, root / "run"))
    state = ocp.StandardCheckpointer().restore(root / "run" / "checkpoints" / "2" / "state")
    return root, root / "run", _flat(state["params"])


@pytest.fixture
def run(pristine, tmp_path):
    shutil.copytree(pristine[1], tmp_path / "run")
    return tmp_path / "run"


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _victim(run: Path) -> Path:
    """The largest array data file of step 4 (ocdbt `d/` folders)."""
    files = [p for p in (run / "checkpoints" / "4" / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def test_digest_lists_every_file_with_size_and_crc(pristine):
    _, run, _ = pristine
    assert _steps(run) == [2, 4]
    for step in (2, 4):
        folder = run / "checkpoints" / str(step)
        digest = json.loads((folder / DIGEST_FILE).read_text())["files"]
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                         if p.is_file() and p.name != DIGEST_FILE)
        assert sorted(digest) == on_disk and len(on_disk) >= 10
        assert any(f.startswith("state/") and "/d/" in f for f in on_disk)
        for rel in on_disk:
            data = (folder / rel).read_bytes()
            assert digest[rel] == {"size": len(data), "crc32": zlib.crc32(data)}, rel
    ckpt = RunCheckpoints(run, async_save=False)
    assert [ckpt.verify(s) for s in (2, 4)] == [True, True]
    ckpt.close()


def _truncate(n):
    return lambda b: b[:n(len(b))]


def _flip(i):
    def f(b):
        b = bytearray(b)
        b[i(len(b))] ^= 0x10
        return bytes(b)
    return f


DAMAGE = {
    "truncated_to_0": (_truncate(lambda n: 0), "truncated to 0 of"),
    "truncated_to_half": (_truncate(lambda n: n // 2), "truncated to"),
    "one_byte_short": (_truncate(lambda n: n - 1), "truncated to"),
    "flip_first_byte": (_flip(lambda n: 0), "is altered"),
    "flip_middle_byte": (_flip(lambda n: n // 2), "is altered"),
    "flip_last_byte": (_flip(lambda n: n - 1), "is altered"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_falls_back_or_is_refused(pristine, run, damage, capfd, tmp_path):
    _, _, ref2 = pristine
    victim = _victim(run)
    rel = victim.relative_to(run / "checkpoints" / "4").as_posix()
    size = victim.stat().st_size
    corrupt, what = DAMAGE[damage]
    victim.write_bytes(corrupt(victim.read_bytes()))
    capfd.readouterr()

    glp = glp_jax.load(run)  # latest: step 4 is skipped with one warning
    assert glp.step == 2
    got = _flat(nnx.state(glp.model, nnx.Param))
    assert sorted(got) == sorted(ref2) and len(got) >= 6
    assert all(np.array_equal(got[k], ref2[k]) for k in ref2)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"glp: warning: checkpoint step 4 of {run} is corrupt (")
    assert rel in err[0] and what in err[0] and err[0].endswith("; using step 2")
    if damage.startswith("trunc") or damage == "one_byte_short":
        assert f"of {size} bytes" in err[0]

    with pytest.raises(CheckpointCorruptError) as e:  # an explicit step: exactly it, or refused
        glp_jax.load(run, step=4)
    msg = str(e.value)
    assert "\n" not in msg and e.value.step == 4 and rel in e.value.reason
    assert str(run) in msg and "step 4" in msg and "intact: [2]" in msg

    out = tmp_path / "x.npy"
    capfd.readouterr()
    assert main(["sample", str(run), "--step", "4", "--n", "3", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glp: error: checkpoint step 4 of") and rel in err[0]
    assert "Traceback" not in err[0] and not out.exists()

    assert main(["sample", str(run), "--n", "3", "--out", str(out)]) == 0
    cap = capfd.readouterr()
    assert np.load(out).shape == (3, 8) and np.isfinite(np.load(out)).all()
    assert "(step 2)" in cap.out
    assert [ln for ln in cap.err.splitlines() if ln.strip()] == [
        ln for ln in cap.err.splitlines() if ln.startswith("glp: warning: checkpoint step 4")]
    assert len(cap.err.strip().splitlines()) == 1


def test_no_intact_step_is_one_line_listing_what_was_tried(run, capfd):
    for step in (2, 4):
        (run / "checkpoints" / str(step) / "state" / "_METADATA").write_bytes(b"{}")
    with pytest.raises(glp_jax.errors.CheckpointError) as e:
        glp_jax.load(run)
    msg = str(e.value)
    assert not isinstance(e.value, CheckpointCorruptError)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint in {run}: tried step 4 (")
    assert "; step 2 (state/_METADATA" in msg


def test_resume_moves_the_corrupt_step_aside_and_continues_from_the_intact_one(
        pristine, run, capfd):
    root = pristine[0]
    victim = _victim(run)
    damaged = victim.read_bytes()[: victim.stat().st_size // 2]
    victim.write_bytes(damaged)
    rel = victim.relative_to(run / "checkpoints" / "4")
    capfd.readouterr()
    train(_config(root, run, stop_at=None))
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("glp: warning")]
    assert len(warnings) == 1
    assert f"checkpoint step 4 of {run} is corrupt" in warnings[0]
    assert str(run / "checkpoints_corrupt" / "4") in warnings[0]
    assert warnings[0].endswith("resuming from step 2")
    assert (run / "checkpoints_corrupt" / "4" / rel).read_bytes() == damaged  # kept, not deleted
    assert _steps(run) == [2, 4, 6]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ckpt = RunCheckpoints(run, async_save=False)
    assert [ckpt.verify(s) for s in (2, 4, 6)] == [True, True, True]  # redone steps digested
    ckpt.close()

    # Steps 6 and 4 corrupt: both go aside (4 beside the first 4, never over it), from 2 again.
    _victim(run).write_bytes(b"")
    (run / "checkpoints" / "6" / "_CHECKPOINT_METADATA").write_bytes(b"")
    capfd.readouterr()
    train(_config(root, run, stop_at=None))
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("glp: warning")]
    assert [w.split(" of ")[0] for w in warnings] == ["glp: warning: checkpoint step 6",
                                                      "glp: warning: checkpoint step 4"]
    assert sorted(p.name for p in (run / "checkpoints_corrupt").iterdir()) == ["4", "4.1", "6"]
    assert _steps(run) == [2, 4, 6]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_run_without_digests_is_trusted_unverified(pristine, run, capfd):
    for p in run.rglob(DIGEST_FILE):
        p.unlink()
    capfd.readouterr()
    ckpt = RunCheckpoints(run, async_save=False)
    assert [ckpt.verify(s) for s in (2, 4)] == [False, False]  # unverified, not corrupt
    ckpt.close()
    glp = glp_jax.load(run)
    assert glp.step == 4 and capfd.readouterr().err.strip() == ""
    assert glp_jax.load(run, step=2).step == 2
    got = _flat(nnx.state(glp_jax.load(run, step=2).model, nnx.Param))
    assert all(np.array_equal(got[k], v) for k, v in pristine[2].items())


def test_unverified_step_orbax_cannot_read_is_one_line_and_skipped(pristine, run, tmp_path):
    """No digest: the damage shows as an orbax error, reported in one line (none of the
    tracebacks the abandoned reads print from other threads) and skipped like any corrupt
    step. `glp` in a subprocess: pytest would swallow those reports in-process."""
    for p in run.rglob(DIGEST_FILE):
        p.unlink()
    for p in (run / "checkpoints" / "4" / "state" / "d").iterdir():  # the merged array data
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointCorruptError) as e:
        glp_jax.load(run, step=4)
    assert "\n" not in str(e.value) and "orbax cannot restore it: ValueError: " in str(e.value)
    assert str(e.value).startswith(f"checkpoint step 4 of {run} is corrupt: ")
    out = tmp_path / "x.npy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for extra, rc, line in ((["--step", "4"], 2, f"glp: error: checkpoint step 4 of {run} is "
                             "corrupt: orbax cannot restore it: ValueError: "),
                            ([], 0, f"glp: warning: checkpoint step 4 of {run} is corrupt "
                             "(orbax cannot restore it: ValueError: ")):
        proc = subprocess.run([sys.executable, "-m", "glp_jax", "sample", str(run), "--n", "3",
                               "--out", str(out), *extra], env=env, capture_output=True,
                              text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == rc and len(err) == 1 and err[0].startswith(line), proc.stderr
    assert np.load(out).shape == (3, 8) and "(step 2)" in proc.stdout


def test_digest_can_be_switched_off(pristine, tmp_path):
    root = pristine[0]
    cfg = _config(root, tmp_path / "off", stop_at=None, num_steps=2)
    cfg.checkpoint_digest = False
    train(cfg)
    assert _steps(tmp_path / "off") == [2]
    assert not list((tmp_path / "off").rglob(DIGEST_FILE))
