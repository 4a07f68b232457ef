"""Every bad invocation of `glp` is one line on stderr naming the problem, a non-zero exit
and no traceback; and it leaves what was on disk as it was."""

import os
import subprocess
import sys

import numpy as np
import pytest

from glp_jax.cli import main
from glp_jax.data.store import ActivationStore, StoreMeta


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny store, a tiny finished run, a regular file and a config with a syntax error."""
    from glp_jax.config import load_config
    from glp_jax.train import train

    root = tmp_path_factory.mktemp("bad")
    store = ActivationStore.create(root / "store", StoreMeta(model="m", layers=[0], d=8,
                                                            shard_rows=64))
    x = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    store.append({0: x}, np.arange(256), np.arange(256) // 8)
    train(load_config([f"train_dataset={root / 'store'}", "num_steps=4", "batch_size=16",
                       "d_model=16", "d_mlp=16", "n_layers=1", "use_bf16=false",
                       f"output_path={root / 'run'}", "progress=false"]))
    (root / "file").write_bytes(b"keep me")
    (root / "bad.yaml").write_text("batch_size: [1, 2\nnum_steps: 3\n")
    return root


def invocations(w):
    run, store, file, out = str(w / "run"), str(w / "store"), str(w / "file"), str(w / "x.npy")
    missing = str(w / "no-such-thing")
    train = [f"train_dataset={store}", "num_steps=2", "batch_size=16", "d_model=8", "d_mlp=8",
             "n_layers=1", "progress=false"]
    return {
        "sample --n -5": (["sample", run, "--n", "-5", "--out", out], "must be a positive integer"),
        "sample --n 0": (["sample", run, "--n", "0", "--out", out], "must be a positive integer"),
        "sample --steps 0": (["sample", run, "--steps", "0", "--out", out], "positive integer"),
        "sample no run": (["sample", missing, "--out", out], "not a training run"),
        "sample no step": (["sample", run, "--step", "999", "--out", out], "step 999"),
        "sample bad step": (["sample", run, "--step", "abc", "--out", out], "step number"),
        "sample no --out": (["sample", run], "--out"),
        "extract into a file": (["extract", "--out", file, "--max-tokens", "10"],
                                "exists and is not a folder"),
        "extract into another model's store": (["extract", "--layers", "0", "--out", store,
                                                "--max-tokens", "10"],
                                               "written with different settings"),
        "extract 0 tokens": (["extract", "--out", missing, "--max-tokens", "0"], "must be positive"),
        "extract missing corpus": (["extract", "--corpus", missing + ".txt", "--out", missing,
                                    "--max-tokens", "10"], "no-such-thing.txt"),
        "extract layer out of range": (["extract", "--layers", "30", "--out", missing,
                                        "--max-tokens", "10"], "out of range"),
        "extract missing model": (["extract", "--model", missing + "/model", "--out", missing,
                                   "--max-tokens", "10"], "does not exist"),
        "extract bad layers": (["extract", "--layers", "a,b", "--out", missing, "--max-tokens",
                                "10"], "--layers"),
        "extract bad policy": (["extract", "--policy", "bogus", "--out", missing, "--max-tokens",
                                "10"], "invalid choice"),
        "store info missing": (["store", "info", missing], "no activation store"),
        "store info file": (["store", "info", file], "it is a file"),
        "store verify missing": (["store", "verify", missing], "no activation store"),
        "train missing config": (["train", f"config={missing}.yaml"], "no-such-thing.yaml"),
        "train yaml syntax": (["train", f"config={w / 'bad.yaml'}"], "bad.yaml"),
        "train unknown key": (["train", *train, "bacth_size=3", f"output_path={w / 'r1'}"],
                              "batch_size"),
        "train bad value": (["train", *train, "batch_size=abc", f"output_path={w / 'r2'}"],
                            "batch_size"),
        "train missing store": (["train", *train[1:], f"train_dataset={missing}",
                                 f"output_path={w / 'r3'}"], "no activation store"),
        "train unwritable": (["train", *train, f"output_path={file}/run"], "cannot write"),
        "train other run": (["train", *train, f"output_path={run}"], "holds a different run"),
        "train 0 steps": (["train", *train, "num_steps=0", f"output_path={w / 'r4'}"],
                          "num_steps"),
        "train 0 activations": (["train", *train[:1], *train[2:], "num_activations=0",
                                 f"output_path={w / 'r5'}"], "num_activations"),
        "train fewer activations than a batch": (["train", *train[:1], *train[2:],
                                                  "num_activations=8", f"output_path={w / 'r6'}"],
                                                 "num_activations"),
        "eval fd missing": (["eval", "fd", missing], "no-such-thing"),
        "eval delta-lm missing": (["eval", "delta-lm", missing], "no-such-thing"),
        "eval recon missing": (["eval", "recon", missing], "no-such-thing"),
        "eval probe missing": (["eval", "probe", missing], "no-such-thing"),
        "eval probe missing task": (["eval", "probe", run, "--tasks", missing + ".csv"],
                                    "no-such-thing.csv"),
        "eval steer missing": (["eval", "steer", missing], "no-such-thing"),
        "eval steer bad rs": (["eval", "steer", run, "--rs", "abc"], "abc"),
        "eval neuron missing": (["eval", "neuron", missing, "--block", "0", "--unit", "0"],
                                "no-such-thing"),
        "eval neuron bad unit": (["eval", "neuron", run, "--block", "0", "--unit", "999"], "999"),
        "eval utility missing": (["eval", "utility", missing], "no-such-thing"),
        "fit missing": (["fit", missing], "no-such-thing"),
        "plot missing": (["plot", missing], "no-such-thing"),
        "sweep bad budgets": (["sweep", "--budgets", "abc", "--root", str(w / "sw")], "abc"),
        "model info bad": (["model", "info", "n_layers=-1", "d_input=8"], "n_layers"),
        "reproduce unknown": (["reproduce", "bogus_key=1"], "unknown ReproducePlan key 'bogus_key'"),
        "pca missing": (["pca", missing, "--out", str(w / "pca")], "no activation store"),
        "export missing": (["export", missing, "--out", str(w / "exp")], "not a training run"),
        "no command": ([], "required"),
        "unknown command": (["frobnicate"], "invalid choice"),
    }


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def test_bad_invocations_are_one_line(world, capsys, monkeypatch, tmp_path):
    """... and fail before any expensive work: from an empty model cache, none of them
    converts the embedded model (a fresh machine's first command must fail at once)."""
    monkeypatch.setenv("GLP_JAX_CACHE", str(tmp_path / "empty-cache"))
    before = {p: p.read_bytes() for p in sorted(world.rglob("*")) if p.is_file()}
    cases = invocations(world)
    assert len(cases) >= 20
    failures = []
    for name, (argv, needle) in cases.items():
        code, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and "Traceback" not in err
              and needle in err and lines[0].startswith("glp"))
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "empty-cache").exists(), "a bad invocation converted the model"
    after = {p: p.read_bytes() for p in before}
    assert after == before  # nothing that existed was changed
    assert not (world / "x.npy").exists()


def test_bad_invocations_through_the_real_command(world):
    """The same from a shell: the installed module entry point, exit status and stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = invocations(world)
    for name in ("sample --n -5", "store info file", "train yaml syntax"):
        argv, needle = cases[name]
        out = subprocess.run([sys.executable, "-m", "glp_jax", *argv], capture_output=True,
                             text=True, env=env)
        assert out.returncode == 2, (name, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr
        assert "Traceback" not in out.stderr


def test_unexpected_error_is_one_line_with_the_traceback_in_a_file(world, capsys, monkeypatch):
    import glp_jax.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero in a bug")

    parser = cli.build_parser()
    args = parser.parse_args(["store", "info", str(world / "store")])
    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, boom))
    code, err = _run(["store", "info", "x"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "ZeroDivisionError" in err
    path = err.split("traceback is in ")[1].split(";")[0]
    text = open(path).read()
    assert "Traceback" in text and "division by zero in a bug" in text
    os.unlink(path)


class _FixedParser:
    def __init__(self, args, fn):
        self.args, self.args.fn = args, fn

    def parse_args(self, argv):
        return self.args
