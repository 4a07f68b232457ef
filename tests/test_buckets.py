"""Stores, runs and locks in buckets, against real protocol servers on loopback: moto's S3
server and fake-gcs-server (tests/objstore.py). No network beyond 127.0.0.1. Every number is
checked against a local-disk run of the same work (bitwise rows, equal losses).

Known emulator gap: fake-gcs-server ignores `ifGenerationMatch` on simple (media) uploads
and deletes, the requests tensorstore's gcs driver sends (a test below shows it). The lock
tests on gs:// therefore send tensorstore's requests through `objstore.GcsPreconditions`, a
loopback front that enforces GCS's documented ifGenerationMatch rule and passes everything
else on; on s3:// moto checks If-Match / If-None-Match itself.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import objstore
import pytest
from etils import epath

from glp_jax.cli import main
from glp_jax.config import load_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import WriterLockedError
from glp_jax.kv import open_kvstore
from glp_jax.lock import LOCK_KEY, RELEASED, Holder, WriterLock, read_holder
from glp_jax.rundir import MetricsLog, read_metrics
from glp_jax.train import train

ROOT = Path(__file__).resolve().parents[1]
META = StoreMeta(model="m", layers=[0], d=8, shard_rows=64)


@pytest.fixture(scope="session", params=["s3", "gs"])
def server(request, tmp_path_factory):
    """One emulator per protocol for the session; its variables are set in this process
    (in-process tests) and passed to subprocesses; torn down at the end."""
    srv = objstore.start(request.param, tmp_path_factory.mktemp(f"objstore-{request.param}"))
    saved = {k: os.environ.get(k) for k in [*srv.env, "TENSORSTORE_GCS_HTTP_URL"]}
    os.environ.update(srv.env)
    yield srv
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.close()


def _unique(server, name: str) -> str:
    return server.url(f"{name}-{time.time_ns()}")


def _rows(n=256, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _fill(url):
    store = ActivationStore.create(url, META)
    store.append({0: _rows()}, np.arange(256) % 50, np.arange(256) // 8)
    return store


# ------------------------------------------------------------------ stores and clear errors
def test_store_in_bucket_reads_bitwise_like_local_and_store_info(server, tmp_path, capsys):
    url = _unique(server, "store")
    _fill(url), _fill(tmp_path / "local")
    got, ref = ActivationStore.open(url), ActivationStore.open(str(tmp_path / "local"))
    assert len(got) == len(ref) == 256
    np.testing.assert_array_equal(got.read_raw(0, 256).view(np.uint16),
                                  ref.read_raw(0, 256).view(np.uint16))
    np.testing.assert_array_equal(got.read_rows([200, 3, 17]), ref.read_rows([200, 3, 17]))
    np.testing.assert_array_equal(got.token_ids(), ref.token_ids())
    np.testing.assert_allclose(got.mean(), ref.mean(), rtol=0, atol=0)
    assert main(["store", "info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 256 and info["url"] == url and info["d"] == 8
    assert main(["store", "verify", url]) == 0
    kv = open_kvstore(url)  # flip one bit of the second shard object: verify names it
    raw = bytearray(kv.read("layer_0/c/1/0").result().value)
    raw[100] ^= 1
    kv.write("layer_0/c/1/0", bytes(raw)).result()
    capsys.readouterr()
    assert main(["store", "verify", url]) == 1
    assert "layer 0 rows [64, 96): checksum mismatch" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "train into it"])
def test_unusable_bucket_is_one_line(server, case, capsys, monkeypatch, tmp_path):
    url = f"{server.scheme}://no-such-bucket-x/acts"
    argv = ["store", "info", url]
    if case == "unreachable endpoint":
        url = server.url("acts")
        dead = f"http://127.0.0.1:{objstore.free_port()}"
        var = "AWS_ENDPOINT_URL" if server.scheme == "s3" else "STORAGE_EMULATOR_HOST"
        monkeypatch.setenv(var, dead)
    if case == "train into it":
        _fill(tmp_path / "store")
        argv = ["train", f"train_dataset={tmp_path / 'store'}", "num_steps=2", "batch_size=16",
                "d_model=8", "d_mlp=8", "n_layers=1", "progress=false", f"output_path={url}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    want = "cannot reach" if case == "unreachable endpoint" else "does not exist"
    assert want in err[0] and (server.scheme + "://") in err[0]


# ------------------------------------------------------------------ writer lock
def _generation_of(kv, key):
    return kv.read(key).result().stamp.generation


def _conditional_write_refuses_a_stale_generation(server):
    kv = open_kvstore(_unique(server, "cond"))
    first = kv.write("k", b"1", if_equal=_generation_of(kv, "k")).result().generation
    assert first  # created (the key was missing)
    assert not kv.write("k", b"x", if_equal=b"\x02").result().generation  # "must be missing"
    second = kv.write("k", b"2", if_equal=first).result().generation
    assert second and second != first
    assert not kv.write("k", b"y", if_equal=first).result().generation  # stale: refused
    assert kv.read("k").result().value == b"2"


@pytest.fixture
def conditional(server, monkeypatch):
    """The server, with GCS preconditions enforced by the loopback front on gs://."""
    if server.scheme != "gs":
        yield server
        return
    front = objstore.GcsPreconditions(server.endpoint)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", front.url)  # tensorstore only
    yield server
    front.close()


def test_conditional_write_refuses_a_stale_generation(conditional):
    _conditional_write_refuses_a_stale_generation(conditional)


def test_fake_gcs_server_alone_ignores_media_preconditions(server):
    """The emulator gap the front fills (if this fails, the emulator learnt preconditions
    and the front can go)."""
    if server.scheme != "gs":
        pytest.skip("moto honours If-Match / If-None-Match")
    kv = open_kvstore(_unique(server, "gap"))
    kv.write("k", b"1").result()
    assert kv.write("k", b"stale", if_equal=b"\x02").result().generation  # accepted anyway


def _race(url, n=6) -> list[str]:
    """n writers in threads race for the lock of `url` at one instant."""
    barrier, out = threading.Barrier(n), []

    def racer():
        lock = WriterLock(url, "racer")
        barrier.wait()
        try:
            lock.acquire()
            out.append("won")
        except WriterLockedError:
            out.append("refused")

    threads = [threading.Thread(target=racer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(out)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _plant(url, **changes):
    """Write a lock key as another writer would have left it."""
    holder = Holder.me("planted writer", "t0")
    holder = Holder(**{**holder.__dict__, **changes})
    open_kvstore(url).write(LOCK_KEY, holder.to_bytes()).result()


def test_racing_writers_exactly_one_wins_free_and_stale_lock(conditional, capsys):
    url = _unique(conditional, "race")
    assert _race(url) == ["refused"] * 5 + ["won"]
    _plant(url, pid=_dead_pid())  # the holder was killed: every racer sees it stale
    assert _race(url) == ["refused"] * 5 + ["won"]


def test_live_holder_refused_dead_or_expired_holder_taken_over(conditional, capsys):
    url = _unique(conditional, "lock")
    with WriterLock(url, "first writer"):
        with pytest.raises(WriterLockedError) as e:
            WriterLock(url, "second").acquire()
        assert "first writer" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert read_holder(url) is None  # released: the key deleted (gs) or marked (s3)
    released = open_kvstore(url).read(LOCK_KEY).result()
    assert (released.value == RELEASED) if conditional.scheme == "s3" else released.state == "missing"
    pid = _dead_pid()
    _plant(url, pid=pid)
    with WriterLock(url, "after kill -9"):
        err = capsys.readouterr().err
        assert "took over" in err and f"pid {pid}" in err and "no longer running" in err
        assert read_holder(url).what == "after kill -9"
    _plant(url, host="another-host", heartbeat=time.time() - 1000, lease_s=120.0)
    with WriterLock(url, "after expiry"):
        assert "heartbeat stopped" in capsys.readouterr().err
    _plant(url, host="another-host")  # fresh heartbeat on another machine: refused
    with pytest.raises(WriterLockedError):
        WriterLock(url, "too early").acquire()


def test_writer_whose_lease_was_taken_stops_before_its_commit(conditional, monkeypatch,
                                                               capsys):
    """A's heartbeat stalls past its lease, B takes over; A's next heartbeat PUT fails its
    condition (the object changed), so A's next append raises and writes nothing."""
    from glp_jax.errors import WriterLockLostError

    url = _unique(conditional, "lease")
    monkeypatch.setenv("GLP_LOCK_LEASE_S", "0.2")
    monkeypatch.setenv("GLP_LOCK_HEARTBEAT_S", "1000")
    a = ActivationStore.open_for_writing(url, META, "writer A")
    a.append({0: _rows(16)}, np.zeros(16), np.arange(16))
    time.sleep(0.4)
    monkeypatch.setenv("GLP_LOCK_LEASE_S", "120")
    b = WriterLock(url, "writer B").acquire()
    assert "heartbeat stopped" in capsys.readouterr().err
    a._lock.refresh()
    with pytest.raises(WriterLockLostError, match="writer B"):
        a.append({0: _rows(16, seed=1)}, np.zeros(16), np.arange(16))
    assert len(ActivationStore.open(url)) == 16
    a.close()  # does not release B's lock
    assert read_holder(url).what == "writer B"
    b.release()
    assert read_holder(url) is None


# ------------------------------------------------------------------ crash safety (kill -9)
STORE_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from glp_jax.data.store import ActivationStore, StoreMeta
    meta = StoreMeta(model="m", layers=[0], d=16, shard_rows=128, chunk_rows=8)
    s = ActivationStore.open_or_create(sys.argv[1], meta)
    print("open", flush=True)
    while True:
        i = len(s) // 37
        x = np.random.default_rng(i).standard_normal((37, 16)).astype(np.float32)
        s.append({0: x}, np.full(37, i), np.full(37, i), cursor={"chunks": i + 1})
""")


def _expected_chunks(n_chunks):
    import ml_dtypes

    xs = [np.random.default_rng(i).standard_normal((37, 16)).astype(np.float32)
          for i in range(n_chunks)]
    return np.concatenate(xs or [np.zeros((0, 16), np.float32)]).astype(ml_dtypes.bfloat16)


def test_kill9_during_store_appends_leaves_the_last_commit(server):
    """No rename on buckets: rows go to their shards first, then one PUT replaces
    commit.npz; a killed writer leaves the previous commit, and readers see only it."""
    url = _unique(server, "crash")
    env = objstore.environ_with(server)
    seen = []
    for delay in (0.7, 1.9):
        proc = subprocess.Popen([sys.executable, "-c", STORE_WRITER, url], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()[-2000:]
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = ActivationStore.open(url)
        n = len(store)
        assert n % 37 == 0 and store.cursor.get("chunks", 0) == n // 37
        want = _expected_chunks(n // 37)
        np.testing.assert_array_equal(store.read_raw(0, n).view(np.uint16), want.view(np.uint16))
        assert store.moments(0).count == n
        seen.append(n)
    assert seen[-1] > 0 and seen[-1] >= seen[0]


METRICS_WRITER = textwrap.dedent("""
    import sys
    from glp_jax.checkpoint import run_path
    from glp_jax.rundir import MetricsLog
    log = MetricsLog(run_path(sys.argv[1]) / "metrics.jsonl", 0, True, flush_s=0.0)
    print("open", flush=True)
    step = 0
    while True:
        step += 1
        log.write({"step": step, "loss": 1.0 / step, "pad": "x" * 200})
""")


def test_kill9_during_metrics_rewrites_never_tears_the_file(server):
    """Buckets cannot append: each flush (here every row) rewrites metrics.jsonl in one PUT,
    so a killed writer leaves the previous whole file (steps 1..n, every line complete)."""
    url = _unique(server, "metrics")
    proc = subprocess.Popen([sys.executable, "-c", METRICS_WRITER, url],
                            env=objstore.environ_with(server), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open", proc.stderr.read()[-2000:]
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    text = (epath.Path(url) / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line parses
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > 2
    assert read_metrics(epath.Path(url) / "metrics.jsonl") == rows


def test_bucket_metrics_are_rewritten_at_most_every_flush_s_and_at_flush(server):
    """A bucket's metrics.jsonl is one PUT per flush, not per row: rows wait until flush_s
    has passed or flush() (training calls it before every checkpoint) makes them durable."""
    path = epath.Path(_unique(server, "metrics-buffered")) / "metrics.jsonl"
    log = MetricsLog(path, 0, True, flush_s=3600.0)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    assert not path.exists()  # nothing flushed yet
    log.flush()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    log.write({"step": 6, "loss": 1 / 6})
    assert len(read_metrics(path)) == 5
    log.flush_s = 0.0
    log.write({"step": 7, "loss": 1 / 7})  # flush_s passed: rewritten at once
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 6, 7]


# ------------------------------------------------------------------ training and load
def _train_cfg(store, out, stop_at=None):
    return load_config([f"train_dataset={store}", "num_steps=6", "batch_size=16", "d_model=16",
                        "d_mlp=16", "n_layers=1", "use_bf16=false", f"output_path={out}",
                        "progress=false", "save_every_n_steps=2", "log_every_n_steps=1",
                        "keep_last_n=3", f"stop_at_step={stop_at}"])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same store and an uninterrupted 6-step run on local disk."""
    root = tmp_path_factory.mktemp("bucket-ref")
    _fill(root / "store")
    train(_train_cfg(root / "store", root / "run"))
    return root


def _losses(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _plant_unfinished_step(ckpts, done: int, killed: int) -> None:
    """What a save killed before its arrays leaves on a bucket (orbax writes a step in place
    there): step `killed`'s metadata objects, no arrays, no commit_success.txt."""
    for rel in ("_CHECKPOINT_METADATA", "config/metadata", "data/metadata"):
        (ckpts / str(killed) / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpts / str(done) / rel).copy(ckpts / str(killed) / rel)
    assert (ckpts / str(killed)).exists() and not (ckpts / str(killed) / "commit_success.txt").exists()


def test_train_in_bucket_resumes_like_local_and_loads(server, local_run):
    import glp_jax
    from glp_jax.rundir import RunDir

    store, run = _unique(server, "acts"), _unique(server, "run")
    _fill(store)
    train(_train_cfg(store, run, stop_at=4))
    _plant_unfinished_step(epath.Path(run) / "checkpoints", done=4, killed=6)
    assert glp_jax.load(run).step == 4  # no commit_success.txt: not a checkpoint
    train(_train_cfg(store, run))  # resumes from step 4, redoes step 6 over the debris
    ref = RunDir(local_run / "run")
    assert _losses(RunDir(run).metrics()) == _losses(ref.metrics())  # exact floats
    base = epath.Path(run)
    for name in ("run.json", "config.json", "normalizer.npz", "metrics.jsonl",
                 "checkpoints/6/commit_success.txt", "checkpoints/6/glp_digest.json"):
        assert (base / name).exists(), name
    assert json.loads((base / "run.json").read_text())["train_dataset"] == store
    got = glp_jax.load(run).sample(4, steps=3, seed=1)
    np.testing.assert_array_equal(got, glp_jax.load(str(local_run / "run")).sample(4, steps=3,
                                                                                   seed=1))


# ------------------------------------------------------------------ launchers
def test_launchers_dry_run_with_bucket_roots():
    env = {**os.environ, "DRY_RUN": "1", "GLP": "glp", "CONFIG": "experiments/cpu/sae.yaml",
           "RUN_ROOT": "s3://b/runs", "DATA_ROOT": "gs://b/acts", "RUN_NAME": "x"}
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["glp", "train", "config=experiments/cpu/sae.yaml", "output_path=s3://b/runs/x"]
    env.update(NAME="l14", MODEL="smollm2", LAYERS="14", RUN_ROOT="gs://b/runs")
    lines = subprocess.run(["bash", str(ROOT / "launch" / "extract.sh")], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert [ln.split()[ln.split().index("--out") + 1] for ln in lines] == [
        "gs://b/acts/l14/val", "gs://b/acts/l14/train"]


def _glp_wrapper(tmp_path) -> str:
    """An executable `glp` running this checkout with this interpreter."""
    path = tmp_path / "glp"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m glp_jax \"$@\"\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow
def test_launcher_local_sh_trains_from_and_into_buckets(server, local_run, tmp_path):
    data_root, run_root = _unique(server, "data"), _unique(server, "runs")
    _fill(data_root + "/acts")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("train_dataset: ${GLP_DATA_ROOT}/acts\nnum_steps: 6\nbatch_size: 16\n"
                   "d_model: 16\nd_mlp: 16\nn_layers: 1\nuse_bf16: false\nprogress: false\n"
                   "save_every_n_steps: 2\nlog_every_n_steps: 1\nkeep_last_n: 3\n")
    env = {**objstore.environ_with(server), "CONFIG": str(cfg), "RUN_NAME": "tiny",
           "RUN_ROOT": run_root, "DATA_ROOT": data_root, "GLP": _glp_wrapper(tmp_path),
           "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", str(ROOT / "launch" / "local.sh")], env=env, cwd=tmp_path,
                   check=True, capture_output=True, timeout=600)
    from glp_jax.rundir import RunDir

    ref = RunDir(local_run / "run")
    assert _losses(RunDir(run_root + "/tiny").metrics()) == _losses(ref.metrics())


# ------------------------------------------------------------------ slow: kill -9 + resume
def _extract_cmd(out, max_tokens=600):
    return [sys.executable, "-m", "glp_jax", "extract", "--corpus", "fortune:riddles,science",
            "--max-tokens", str(max_tokens), "--out", out, "--window-docs", "4",
            "--flush-rows", "40", "--quiet"]


@pytest.fixture(scope="module")
def local_extraction(tmp_path_factory):
    """An uninterrupted extraction on local disk: the reference rows."""
    out = str(tmp_path_factory.mktemp("extract-ref") / "acts")
    subprocess.run(_extract_cmd(out), check=True, capture_output=True, timeout=600,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return ActivationStore.open(out)


def _wait_until(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"exited before {what}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    raise TimeoutError(what)


def _rows_at_least(url, n):
    def check():
        try:
            return len(ActivationStore.open(url)) >= n
        except Exception:  # not created yet
            return False
    return check


@pytest.mark.slow
def test_extract_into_bucket_kill9_resume_is_bitwise_local(server, local_extraction):
    url = _unique(server, "extract")
    env = {**objstore.environ_with(server), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_extract_cmd(url), env=env, stderr=subprocess.PIPE, text=True)
    _wait_until(_rows_at_least(url, 200), proc, "200 committed rows")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ref, n = local_extraction, len(ActivationStore.open(url))
    assert 200 <= n < len(ref)
    np.testing.assert_array_equal(ActivationStore.open(url).read_raw(0, n).view(np.uint16),
                                  ref.read_raw(0, n).view(np.uint16))
    subprocess.run(_extract_cmd(url), env=env, check=True, capture_output=True, timeout=600)
    done = ActivationStore.open(url)
    assert len(done) == len(ref)
    np.testing.assert_array_equal(done.read_raw(0, len(ref)).view(np.uint16),
                                  ref.read_raw(0, len(ref)).view(np.uint16))
    np.testing.assert_array_equal(done.token_ids(), ref.token_ids())
    np.testing.assert_array_equal(done.doc_ids(), ref.doc_ids())
    np.testing.assert_allclose(done.mean(), ref.mean(), rtol=1e-12)
    info = subprocess.run([sys.executable, "-m", "glp_jax", "store", "info", url, "--json"],
                          env=env, check=True, capture_output=True, text=True, timeout=300)
    assert json.loads(info.stdout)["rows"] == len(ref)


LONG = ["num_steps=300", "data_mode=repeat", "batch_size=16", "d_model=16", "d_mlp=16", "n_layers=1",
        "use_bf16=false", "progress=false", "save_every_n_steps=50", "log_every_n_steps=10",
        "keep_last_n=2"]


@pytest.fixture(scope="module")
def local_long_run(local_run):
    train(load_config([f"train_dataset={local_run / 'store'}", *LONG,
                       f"output_path={local_run / 'long'}"]))
    return local_run / "long"


@pytest.mark.slow
def test_glp_train_in_bucket_kill9_resume_matches_local(server, local_long_run):
    from glp_jax.rundir import RunDir

    store, run = _unique(server, "acts"), _unique(server, "long")
    _fill(store)
    cmd = [sys.executable, "-m", "glp_jax", "train", f"train_dataset={store}", *LONG,
           f"output_path={run}"]
    env = objstore.environ_with(server)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    marker = epath.Path(run) / "checkpoints" / "100" / "commit_success.txt"
    _wait_until(marker.exists, proc, "checkpoint 100")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (epath.Path(run) / "checkpoints" / "300").exists()  # killed mid-run
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    assert _losses(RunDir(run).metrics()) == _losses(RunDir(local_long_run).metrics())
    assert RunDir(run).finished()
