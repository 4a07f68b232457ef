"""One writer at a time: a second writer is refused with the holder's host, pid and start;
a lock left by a writer killed with kill -9 is taken over; of writers racing for a free lock
exactly one wins; a writer whose lease was taken stops before writing more."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from glp_jax.cli import main
from glp_jax.data.store import COMMIT_KEY, ActivationStore, StoreMeta
from glp_jax.errors import WriterLockedError, WriterLockLostError
from glp_jax.lock import LOCK_KEY, WriterLock, read_holder

META = StoreMeta(model="m", layers=[0], d=4, shard_rows=64)
HOLD = ("import sys, time\nfrom glp_jax.data.store import ActivationStore, StoreMeta\n"
        "s = ActivationStore.open_for_writing(sys.argv[1], StoreMeta(model='m', layers=[0], d=4, "
        "shard_rows=64), 'test writer')\nprint('held', flush=True)\ntime.sleep(120)\n")


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rindex(")") + 2]


def test_second_writer_refused_then_kill9_taken_over(tmp_path, capsys):
    path = tmp_path / "s"
    proc = _holder(path)
    try:
        holder = read_holder(str(path))
        assert holder.pid == proc.pid and holder.host == socket.gethostname()
        assert holder.what == "test writer"
        with pytest.raises(WriterLockedError) as e:
            ActivationStore.open_for_writing(path, META)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(e.value)
        code = main(["extract", "--layers", "0", "--out", str(path), "--max-tokens", "10"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "test writer" in err
        assert len(ActivationStore.open(path)) == 0  # readers never need the lock
        os.kill(proc.pid, signal.SIGKILL)
        for _ in range(100):  # killed but not reaped: a zombie still has its pid
            if _state(proc.pid) == "Z":
                break
            time.sleep(0.05)
        with ActivationStore.open_for_writing(path, META) as store:
            err = capsys.readouterr().err
            assert f"took over the writer lock of {path}" in err and str(proc.pid) in err
            assert "no longer running" in err
            assert read_holder(str(path)).pid == os.getpid()
            store.append({0: np.ones((3, 4))}, np.zeros(3), np.arange(3))
        assert read_holder(str(path)) is None and not (path / LOCK_KEY).exists()
        assert len(ActivationStore.open(path)) == 3
    finally:
        proc.kill()
        proc.wait()


RACE = ("import sys, time\nfrom glp_jax.lock import WriterLock\nfrom glp_jax.errors import "
        "WriterLockedError\nt0 = float(sys.argv[2])\nwhile time.time() < t0: pass\ntry:\n"
        "    WriterLock(sys.argv[1], 'racer').acquire()\n    print('won', flush=True)\n"
        "    time.sleep(3)\nexcept WriterLockedError:\n    print('refused', flush=True)\n")


def test_racing_writers_exactly_one_wins(tmp_path):
    for rnd in range(2):  # a free lock, then one left by a dead process
        start = time.time() + 2.5
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "r"), str(start)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        outs = sorted(p.communicate()[0].strip() for p in procs)
        assert outs == ["refused"] * 3 + ["won"], outs
        if rnd == 0:  # the winner exited without releasing (no `with`): its lock is stale
            assert read_holder(str(tmp_path / "r")).what == "racer"


def test_lost_lease_stops_the_writer_before_it_commits(tmp_path, monkeypatch, capsys):
    path = tmp_path / "s"
    monkeypatch.setenv("GLP_LOCK_LEASE_S", "0.2")
    monkeypatch.setenv("GLP_LOCK_HEARTBEAT_S", "1000")  # A's heartbeat never runs on its own
    a = ActivationStore.open_for_writing(path, META, "writer A")
    a.append({0: np.ones((2, 4))}, np.zeros(2), np.arange(2))
    time.sleep(0.4)  # A's heartbeat is older than its lease: stale
    monkeypatch.setenv("GLP_LOCK_LEASE_S", "120")
    b = WriterLock(str(path), "writer B").acquire()
    assert "heartbeat stopped" in capsys.readouterr().err
    a._lock.refresh()  # A's next heartbeat finds the lock taken
    before = (path / COMMIT_KEY).read_bytes()
    with pytest.raises(WriterLockLostError) as e:
        a.append({0: np.zeros((2, 4))}, np.zeros(2), np.arange(2))
    assert "writer B" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert (path / COMMIT_KEY).read_bytes() == before and len(ActivationStore.open(path)) == 2
    a.close()  # does not release B's lock
    assert json.loads((path / LOCK_KEY).read_bytes())["what"] == "writer B"
    b.release()
    assert read_holder(str(path)) is None


def test_heartbeat_refreshes_the_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("GLP_LOCK_HEARTBEAT_S", "0.1")
    lock = WriterLock(str(tmp_path / "h"), "beating").acquire()
    first = read_holder(str(tmp_path / "h")).heartbeat
    time.sleep(0.5)
    second = read_holder(str(tmp_path / "h"))
    assert second.heartbeat > first and second.started == first
    lock.check()
    lock.release()


def test_memory_store_lock(capsys):
    url = "memory://locktest/s"
    with ActivationStore.open_for_writing(url, META):
        with pytest.raises(WriterLockedError):
            ActivationStore.open_for_writing(url, META)
    with ActivationStore.open_for_writing(url, META) as store:
        assert len(store) == 0


TRAIN = ["num_steps=100000", "data_mode=repeat", "batch_size=16", "d_model=8", "d_mlp=8",
         "n_layers=1", "use_bf16=false", "save_every_n_steps=50", "log_every_n_steps=50",
         "progress=false", "keep_last_n=2"]


def test_two_trainings_into_one_folder_and_kill9_resume(tmp_path, capsys):
    store = ActivationStore.create(tmp_path / "s", META)
    store.append({0: np.random.default_rng(0).standard_normal((256, 4))}, np.zeros(256),
                 np.arange(256))
    run = tmp_path / "run"
    args = [f"train_dataset={tmp_path / 's'}", f"output_path={run}", *TRAIN]
    first = subprocess.Popen([sys.executable, "-m", "glp_jax", "train", *args],
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "100").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        code = main(["train", *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"glp train (pid {first.pid} on host {socket.gethostname()}" in err
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
        first.wait()
    from glp_jax.checkpoint import RunCheckpoints

    ckpt = RunCheckpoints(run, async_save=False)
    resume_from = ckpt.latest_step()
    ckpt.close()
    stop = resume_from + 50  # a logging step
    assert main(["train", *args, f"stop_at_step={stop}"]) == 0
    assert "took over the writer lock" in capsys.readouterr().err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert steps == sorted(set(steps)) and steps[-1] == stop  # each step once, in order
    assert read_holder(str(run)) is None
