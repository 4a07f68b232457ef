"""Preemption of training: a real SIGTERM to a real `glp train` finishes the step, writes a
checkpoint, exits 75 with one line, and the rerun reproduces the uninterrupted losses
exactly; launch/local.sh reruns a preempted run; two processes stop at the same step."""

import glob
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from wandb_records import wandb_records

from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.preempt import PREEMPTED_EXIT

ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 1000, 25


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    rng = np.random.default_rng(0)
    s = ActivationStore.create(root / "train", StoreMeta(model="m", layers=[0], d=8, shard_rows=512))
    x = (rng.standard_normal((2048, 8)) @ rng.standard_normal((8, 8)) + 1).astype(np.float32)
    s.append({0: x}, np.zeros(2048), np.zeros(2048))
    return root


def _settings(root, out):
    """A tiny run long enough (~3 s of steps) to be signalled in the middle."""
    return dict(train_dataset=root / "train", n_layers=1, d_model=16, d_mlp=32, batch_size=16,
                num_steps=STEPS, data_mode="repeat", use_bf16=False, learning_rate=3e-3,
                log_every_n_steps=LOG_EVERY, save_every_n_steps=100_000, progress=False,
                output_path=out, preempt_check_every_n_steps=5)


def _cmd(root, out):
    return [sys.executable, "-m", "glp_jax", "train",
            *[f"{k}={v}" for k, v in _settings(root, out).items()]]


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "GLP_CPU_DEVICES": "1",
            **{k: str(v) for k, v in extra.items()}}


def _losses(out):
    rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["step"], r["loss"], r["grad_norm"]] for r in rows])


def _wait_metrics(out, procs, timeout=300):
    """Until the run has logged a row (its steps are under way)."""
    t0 = time.time()
    path = Path(out) / "metrics.jsonl"
    while not (path.exists() and path.read_text().count("\n") >= 1):
        for p in procs:
            assert p.poll() is None, "the run ended before it could be signalled"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(store):
    out = store / "uninterrupted"
    subprocess.run(_cmd(store, out), env=_env(), check=True, capture_output=True)
    got = _losses(out)
    assert got[-1, 0] == STEPS
    return got


def test_sigterm_checkpoints_exits_75_and_resume_reproduces_losses(store, reference):
    out = store / "preempted"
    cmd = _cmd(store, out) + ["trackers=[jsonl,tensorboard,wandb]"]
    env = _env(WANDB_MODE="offline", WANDB_DIR=store, WANDB_SILENT="true")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_metrics(out, [proc])
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    lines = err.strip().splitlines()
    m = re.fullmatch(rf"glp: stopped on SIGTERM after step (\d+) of {STEPS}; checkpoint (\d+) "
                     rf"is in .*checkpoints; rerun the same command to resume", lines[-1])
    assert m and m[1] == m[2], lines[-3:]
    step = int(m[1])
    assert LOG_EVERY <= step < STEPS
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [step]
    assert not (out / "glp_writer.lock").exists()  # released: the rerun needs no takeover
    partial = _losses(out)  # flushed: every row up to the stop, none after
    assert partial[-1, 0] == step - step % LOG_EVERY
    np.testing.assert_array_equal(partial, reference[: len(partial)])
    # The trackers were flushed and closed: W&B holds every row and knows it was preempted.
    [wandb_file] = glob.glob(str(store / "wandb" / "offline-run-*" / "*.wandb"))
    records = list(wandb_records(wandb_file))
    assert any(r.WhichOneof("record_type") == "preempting" for r in records)
    logged = [json.loads(next(i.value_json for i in r.history.item if i.nested_key == ["loss"]))
              for r in records if r.WhichOneof("record_type") == "history"]
    np.testing.assert_array_equal(logged, partial[:, 1])
    if step % LOG_EVERY:  # stopped inside a log window: the window is kept for the resume
        saved = json.loads((out / "train_window.json").read_text())["windows"][str(step)]
        assert len(saved["loss"]) == step % LOG_EVERY

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # Same device, same compiled step, restored state: bitwise the uninterrupted trajectory
    # (window means included).
    np.testing.assert_array_equal(_losses(out), reference)


def test_sigkill_resume_restores_the_log_window_and_purges_tensorboard(store, reference):
    """A hard kill leaves rows and events past the newest checkpoint; the rerun redoes them:
    metrics.jsonl and TensorBoard (purge step) end up holding each step once, and checkpoints
    taken inside a log window (every 10 steps, rows every 25) carry that window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = store / "killed"
    cmd = _cmd(store, out) + ["trackers=[jsonl,tensorboard]"]
    proc = subprocess.Popen(cmd + ["save_every_n_steps=10"], env=_env(), stderr=subprocess.PIPE,
                            text=True)
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists()
               and (out / "metrics.jsonl").read_text().count("\n") >= 4):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)  # no more saves
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(_losses(out), reference)
    ea = EventAccumulator(str(out), size_guidance={"scalars": 0})
    ea.Reload()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    got = [(e.step, np.float32(e.value)) for e in ea.Scalars("loss")]
    assert got == [(int(s), np.float32(v)) for s, v in reference[:, :2]]


def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_local_launcher_reruns_a_preempted_run_until_it_completes(store, reference, tmp_path):
    glp = tmp_path / "glp"  # the launchers call $GLP; this one runs the checkout under test
    glp.write_text(f"#!/bin/sh\nexec {sys.executable} -m glp_jax \"$@\"\n")
    glp.chmod(glp.stat().st_mode | stat.S_IEXEC)
    settings = _settings(store, "unused")
    settings.pop("output_path")
    config = tmp_path / "tiny.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    out = tmp_path / "runs" / "loop"
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh")], cwd=ROOT,
                            env=_env(GLP=glp, CONFIG=config, RUN_ROOT=tmp_path / "runs",
                                     RUN_NAME="loop", RETRY_DELAY_S=0),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_metrics(out, [proc])
    [child] = _children(proc.pid)  # the glp process, not the launcher: a preemption
    os.kill(child, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "glp: stopped on SIGTERM" in err
    assert "launch: preempted (exit 75); rerun 1/10 resumes from the checkpoint" in err
    np.testing.assert_array_equal(_losses(out), reference)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_is_signalled(store, reference):
    out = store / "twoproc"

    def launch():
        port = _free_port()
        return [subprocess.Popen(_cmd(store, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=_env(GLP_COORDINATOR=f"127.0.0.1:{port}",
                                                     GLP_NUM_PROCESSES=2, GLP_PROCESS_ID=i))
                for i in range(2)]

    procs = launch()
    _wait_metrics(out, procs)
    os.kill(procs[1].pid, signal.SIGTERM)  # only process 1: process 0 learns it from the agreement
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT] * 2, [e[-1500:] for e in errs]
    steps = [int(re.search(r"after step (\d+) ", e)[1]) for e in errs]
    assert steps[0] == steps[1] and steps[0] % 5 == 0  # agreed at a check step
    assert "stopped on SIGTERM" in errs[1] and "stopped on a signal to another process" in errs[0]
    assert (out / "checkpoints" / str(steps[0])).exists()
    procs = launch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
    got = _losses(out)
    np.testing.assert_array_equal(got[:, 0], reference[:, 0])
    np.testing.assert_allclose(got[:, 1:], reference[:, 1:], rtol=2e-5)
