"""Many extraction workers into one logical store, and preemption of `glp extract`: real
SmolLM2, real tensorstore, real signals to real `python -m glp_jax extract` processes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glp_jax.config import ExtractConfig
from glp_jax.data.corpus import WorkerShard, fortune_corpus, open_corpus
from glp_jax.data.multistore import (
    MultiWorkerStore,
    layout,
    open_worker_for_writing,
    worker_dir,
    worker_share,
)
from glp_jax.data.pipeline import PipelineConfig, build_pipeline
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import GLPError, StoreError, WriterLockedError
from glp_jax.llm.extract import Extractor, extract_to_store, extraction_meta
from glp_jax.preempt import PREEMPTED_EXIT, Preempted, PreemptionGuard

ROOT = Path(__file__).resolve().parents[1]
SPEC = "fortune:riddles,science"
BLOCK = 64
TOTAL = 600  # rows of the logical store: 300 per worker
FLAGS = ["--max-length", "32", "--window-docs", "4", "--flush-rows", "1", "--quiet"]


def _cfg(lm, **kw):
    return ExtractConfig(corpus=kw.pop("corpus", SPEC), max_length=32, window_docs=4,
                         flush_rows=1, **kw).for_model(lm.n_layers)


def extract_worker(lm, root, w, n=2, total=TOTAL, guard=None):
    """What `glp extract --worker w --workers n` does, in this process."""
    cfg = _cfg(lm)
    corpus = open_corpus(SPEC)
    meta = extraction_meta(cfg, lm.model_id, lm.d, corpus.name)
    with open_worker_for_writing(str(root), meta, w, n, BLOCK) as store:
        extract_to_store(Extractor(lm, cfg), WorkerShard(corpus, w, n), store,
                         worker_share(total, w, n), progress=False, guard=guard)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "glp_jax", "extract", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(url, proc, timeout=180.0):
    """Rows committed at `url` once the first commit lands (the process still running)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(os.path.join(url, "glp_store.json")):
            n = len(ActivationStore.open(url))
            if n:
                return n
        time.sleep(0.05)
    raise AssertionError("no commit in time")


def _same_rows(a, b):
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.read_raw(0, len(a)).view(np.uint16),
                                  b.read_raw(0, len(b)).view(np.uint16))
    np.testing.assert_array_equal(a.token_ids(), b.token_ids())
    np.testing.assert_array_equal(a.doc_ids(), b.doc_ids())


def _numpy_moments(view):
    x = view.read_raw(0, len(view)).astype(np.float64)
    return x.mean(0), x.var(0)


# ----------------------------------------------------------------------------- pure
def test_layout_visible_prefix_only_grows():
    """Round-robin blocks; a running worker's unfinished block stops the prefix; rows once
    visible keep their place as workers progress at random speeds."""
    segs = layout([200, 70, 0], [True, False, True], 64)
    assert segs.tolist() == [[0, 0, 0, 64], [64, 1, 0, 64], [128, 0, 64, 64]]
    rng = np.random.default_rng(0)
    final = [300, 129, 64, 5]
    rows, done, prev = [0] * 4, [False] * 4, np.zeros((0, 4), np.int64)
    while not all(done):
        w = int(rng.integers(4))
        rows[w] = min(final[w], rows[w] + int(rng.integers(1, 90)))
        done[w] = rows[w] == final[w]
        segs = layout(rows, done, 64)
        assert np.array_equal(segs[: len(prev)], prev)
        prev = segs
    assert prev[:, 3].sum() == sum(final) and prev[-1].tolist()[1:] == [0, 256, 44]


def test_worker_settings_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    meta = StoreMeta(model="m", layers=[3], d=8, corpus="c")
    root = str(tmp_path / "root")
    held = open_worker_for_writing(root, meta, 0, 2, BLOCK)
    try:
        with pytest.raises(WriterLockedError, match="worker 0 of .* is already running"):
            open_worker_for_writing(root, meta, 0, 2, BLOCK)
    finally:
        held.close()
    with pytest.raises(StoreError, match="mismatched worker settings.*workers: root has 2"):
        open_worker_for_writing(root, meta, 0, 3, BLOCK)
    other = StoreMeta(model="other-model", layers=[3], d=8, corpus="c")
    with pytest.raises(StoreError, match="mismatched worker settings.*model: root has 'm'"):
        open_worker_for_writing(root, other, 1, 2, BLOCK)
    with pytest.raises(GLPError, match="--worker 2 is not in"):
        open_worker_for_writing(root, meta, 2, 2, BLOCK)
    plain = ActivationStore.create(str(tmp_path / "plain"), meta)
    with pytest.raises(StoreError, match="holds a single-worker store"):
        open_worker_for_writing(plain.url, meta, 0, 2, BLOCK)
    from glp_jax.cli import main

    assert main(["extract", "--corpus", "fortune:riddles", "--max-tokens", "10", "--out", root]) == 2
    assert "holds a multi-worker store: pass --worker I --workers N" in capsys.readouterr().err
    assert main(["extract", "--corpus", "fortune:riddles", "--max-tokens", "10", "--out", root,
                 "--workers", "slurm"]) == 2
    assert "--workers slurm needs SLURM_NTASKS" in capsys.readouterr().err
    # A sub-store of another worker moved into this slot is refused on reading.
    os.rename(os.path.join(root, worker_dir(0, 2)), os.path.join(root, worker_dir(1, 2)))
    with pytest.raises(StoreError, match="is not worker 1 of this store"):
        ActivationStore.open(root)


# ----------------------------------------------------------------------------- with SmolLM2
@pytest.fixture(scope="module")
def reference(smollm2, tmp_path_factory):
    """Two uninterrupted workers."""
    root = tmp_path_factory.mktemp("ref") / "acts"
    for w in (0, 1):
        extract_worker(smollm2, root, w)
    return ActivationStore.open(str(root))


def test_workers_form_one_store(smollm2, reference):
    view = reference
    assert isinstance(view, MultiWorkerStore) and len(view) == TOTAL
    # Statistics merged over workers equal numpy float64 over every row of the view.
    mean, var = _numpy_moments(view)
    np.testing.assert_allclose(view.mean(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(view.var(), var, rtol=1e-10, atol=1e-12)
    # Disjoint documents: worker w holds split documents i % 2 == w, each with exactly
    # its tokenizer ids 1..31, and the view's order is blocks of 64 rows, round-robin.
    docs = fortune_corpus(["riddles", "science"]).split("train")
    doc, tok = view.doc_ids(), view.token_ids()
    for i in np.unique(doc):
        ids = smollm2.tokenizer(docs[i].text)["input_ids"][:31]
        got = tok[doc == i]
        np.testing.assert_array_equal(got, ids[: len(got)])
    for b in range(8):  # 4 full rounds, then each worker's last 44 rows
        assert set(doc[b * BLOCK:(b + 1) * BLOCK] % 2) == {b % 2}
    assert set(doc[512:556] % 2) == {0} and set(doc[556:] % 2) == {1}
    idx = np.random.default_rng(1).integers(0, TOTAL, 50)
    np.testing.assert_array_equal(view.read_rows(idx), view.read_range(0, TOTAL)[idx])


def test_killed_worker_reruns_bit_for_bit(smollm2, reference, tmp_path):
    """kill -9 one worker (a real `python -m glp_jax extract`) mid-run, rerun it: the
    logical store equals two uninterrupted workers, and what was visible stays in place."""
    root = tmp_path / "acts"
    extract_worker(smollm2, root, 1)
    proc = _start(["--corpus", SPEC, "--max-tokens", str(TOTAL), "--out", str(root),
                   "--worker", "0", "--workers", "2", "--worker-block-rows", str(BLOCK), *FLAGS])
    _wait_for_rows(str(root / worker_dir(0, 2)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    view = ActivationStore.open(str(root))
    before = view.read_raw(0, len(view)).view(np.uint16)
    assert 0 < view.worker_progress()[0]["rows"] < 300 and len(view) < TOTAL
    extract_worker(smollm2, root, 0)  # the rerun resumes from worker 0's cursor
    assert view.refresh() == TOTAL
    _same_rows(view, reference)
    np.testing.assert_array_equal(view.read_raw(0, len(before)).view(np.uint16), before)


def test_partial_view_statistics_and_follow_mode(smollm2, reference, tmp_path):
    """While worker 1 lags, the view shows the final-place prefix with its exact float64
    moments; a follow pipeline trains while worker 1 finishes and reads exactly the rows
    (and only committed ones) of the finished store."""
    root = tmp_path / "acts"
    extract_worker(smollm2, root, 0)
    guard = PreemptionGuard()
    guard.request()
    with pytest.raises(Preempted, match="rows committed"):
        extract_worker(smollm2, root, 1, guard=guard)  # stops after its first window
    view = ActivationStore.open(str(root))
    w1 = view.worker_progress()[1]["rows"]
    assert 0 < w1 < 300 and len(view) < 300 + w1
    mean, var = _numpy_moments(view)
    np.testing.assert_allclose(view.mean(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(view.var(), var, rtol=1e-10, atol=1e-12)

    cfg = PipelineConfig(store=str(root), batch_size=32, mode="follow", seed=0,
                         follow_block_batches=2, follow_poll_s=0.05, follow_timeout_s=120)
    pipe = build_pipeline(cfg, 0, 1)
    it = pipe.make_iterator()
    first = next(it)
    worker = threading.Thread(target=extract_worker, args=(smollm2, root, 1))
    worker.start()
    batches = [first, *it]
    worker.join()
    it.close()
    index = np.concatenate([b["index"] for b in batches])
    assert len(batches) == TOTAL // 32 and len(np.unique(index)) == index.size
    final = ActivationStore.open(str(root))
    _same_rows(final, reference)
    x = np.concatenate([b["x"] for b in batches])
    want = (final.read_rows(index) - pipe.mean[0].astype(np.float32)) / pipe.std[0].astype(np.float32)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-5)


def test_store_info_and_verify_see_one_store(reference, tmp_path, capsys):
    import shutil

    from glp_jax.cli import main

    root = tmp_path / "copy"
    shutil.copytree(reference.url, root)
    assert main(["store", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"rows:    {TOTAL}" in out and "workers: 2" in out and "worker 1: 300 rows" in out
    assert main(["store", "verify", "--quiet", str(root)]) == 0
    assert "ok: every chunk" in capsys.readouterr().out
    shard = root / worker_dir(1, 2) / "layer_14" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["store", "verify", "--quiet", str(root)]) == 1
    assert "worker 1 layer 14 rows [0, 32): checksum mismatch" in capsys.readouterr().out


def test_sigterm_stops_extract_and_rerun_resumes(smollm2, tmp_path, capsys):
    """SIGTERM to a real `python -m glp_jax extract` over an hf: folder: exit 75 with one
    line, lock released, finished documents committed; the rerun equals one uninterrupted
    run bit for bit."""
    from glp_jax.cli import main

    data = tmp_path / "hf"
    data.mkdir()
    docs = fortune_corpus(["riddles", "science"]).split("all", seed=5)[:80]
    rows = [{"text": d.text, "label": d.label} for d in docs]
    for i, part in enumerate((rows[:40], rows[40:])):
        pq.write_table(pa.Table.from_pylist(part), data / f"train-{i:05d}-of-00002.parquet")
    spec, out = f"hf:{data}", str(tmp_path / "acts")
    args = ["--corpus", spec, "--val-docs", "4", "--max-tokens", "400", "--out", out, *FLAGS]
    proc = _start(args)
    _wait_for_rows(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("glp: stopped on SIGTERM after document") and "rerun" in last
    assert not os.path.exists(os.path.join(out, "glp_writer.lock"))
    assert 0 < len(ActivationStore.open(out)) < 400
    assert main(["extract", *args]) == 0
    assert "took over" not in capsys.readouterr().err

    cfg = _cfg(smollm2, corpus=spec, val_docs=4)
    corpus = open_corpus(spec)
    ref = ActivationStore.create(str(tmp_path / "ref"), extraction_meta(
        cfg, smollm2.model_id, smollm2.d, corpus.name))
    extract_to_store(Extractor(smollm2, cfg), corpus, ref, 400, progress=False)
    _same_rows(ActivationStore.open(out), ref)


# ----------------------------------------------------------------------------- launcher
def _launch(tmp_path, **env):
    full = {**os.environ, "GLP": "glp", "NAME": "x", "DATA_ROOT": "/d", **env}
    return subprocess.run(["bash", str(ROOT / "launch" / "extract.sh")], env=full, cwd=ROOT,
                          capture_output=True, text=True)


def test_launcher_workers_and_bounded_requeue(tmp_path):
    import shlex

    out = _launch(tmp_path, DRY_RUN="1", WORKERS="2").stdout.strip().splitlines()
    val, *train = [shlex.split(ln) for ln in out]
    assert val[val.index("--split") + 1] == "val" and len(train) == 2
    for w, cmd in enumerate(train):
        assert cmd[:2] == ["env", f"CUDA_VISIBLE_DEVICES={w}"]
        assert cmd[cmd.index("--worker") + 1] == str(w) and cmd[cmd.index("--workers") + 1] == "2"
        assert cmd[cmd.index("--out") + 1] == "/d/x/train"
    # A worker that keeps exiting 75 (preempted) is rerun MAX_RESTARTS times, then gives up
    # with 75; the validation run (exit 0) runs once.
    log = tmp_path / "calls"
    fake = tmp_path / "glp"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
                    '[[ "$*" == *"--split train"* ]] && exit 75\nexit 0\n')
    fake.chmod(0o755)
    res = _launch(tmp_path, GLP=str(fake), MAX_RETRIES="2", RETRY_DELAY_S="0")
    assert res.returncode == 75
    calls = log.read_text().splitlines()
    assert sum("--split val" in c for c in calls) == 1
    assert sum("--split train" in c for c in calls) == 3
    assert res.stderr.count("preempted (exit 75)") == 2


def test_launcher_ctrl_c_stops_every_worker_without_rerun(tmp_path):
    """Ctrl-C (SIGINT to the launcher's process group) reaches each worker, which exits 75
    as `glp extract` does; the launcher then reruns none of them."""
    log = tmp_path / "calls"
    fake = tmp_path / "glp"
    fake.write_text(f"#!{sys.executable}\n"
                    "import signal, sys, time\n"
                    f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    "if 'val' in sys.argv: sys.exit(0)\n"
                    "for s in (signal.SIGINT, signal.SIGTERM):\n"
                    "    signal.signal(s, lambda *a: sys.exit(75))\n"
                    "time.sleep(60)\n")
    fake.chmod(0o755)
    env = {**os.environ, "GLP": str(fake), "NAME": "x", "DATA_ROOT": "/d", "WORKERS": "2",
           "DEVICE": "cpu", "RETRY_DELAY_S": "0"}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "extract.sh")], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (log.exists() and len(log.read_text().splitlines()) == 3):
        assert time.monotonic() - t0 < 30
        time.sleep(0.05)
    time.sleep(0.5)  # both workers have installed their handlers
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert len(log.read_text().splitlines()) == 3 and "rerun" not in err
