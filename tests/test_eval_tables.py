"""`glp eval fd|recon` and `glp pca` over a tiny real sweep (two GLP depths), an SAE run
and a PCA folder: every table row equals the single-target evaluation it summarises."""

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import r2_score

from glp_jax.cli import main
from glp_jax.config import make_config
from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.evals.fd import evaluate_fd, reference_rows
from glp_jax.evals.recon import Identity
from glp_jax.evals.tables import depth_trend, find_targets
from glp_jax.pca import PCA, PCAReconstruction
from glp_jax.sweep import SweepPlan, run_local_sweep
from glp_jax.train import train

D = 8
COMMON = dict(d_model=16, d_mlp=32, batch_size=64, learning_rate=3e-3, use_bf16=False,
              log_every_n_steps=10, save_every_n_steps=20, eval_rows=64, epoch_size=640,
              data_mode="repeat", progress=False)


def _store(path, n_docs, first_doc, rng, mix):
    docs = np.repeat(np.arange(first_doc, first_doc + n_docs), rng.integers(1, 8, n_docs))
    x = (rng.standard_normal((len(docs), D)) @ mix + 2.0).astype(np.float32)
    s = ActivationStore.create(path, StoreMeta(model="m", layers=[0], d=D, shard_rows=512))
    s.append({0: x}, np.zeros(len(docs)), docs)
    return s


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((D, D))
    _store(root / "train", 300, 0, rng, mix)
    _store(root / "val", 90, 10_000, rng, mix)
    data = [f"train_dataset={root / 'train'}", f"val_dataset={root / 'val'}"]
    over = [f"{k}={v}" for k, v in COMMON.items()] + data
    run_local_sweep(over, SweepPlan((1, 2), (1280,)), root / "sweep", progress=False)
    train(make_config(dict(COMMON, train_dataset=str(root / "train"), val_dataset=str(root / "val"),
                           model="sae", sae_width=32, sae_k=4, num_steps=20, weight_decay=0.0,
                           output_path=str(root / "sae"))))
    assert main(["pca", str(root / "train"), "--out", str(root / "pca"), "--quiet"]) == 0
    return root


def test_targets_are_classified(root):
    glps, baselines = find_targets([root / "sweep", root / "sae", root / "pca"])
    assert [p.name for p in glps] == ["d1-a1280-s0", "d2-a1280-s0"]
    assert [p.name for p in baselines] == ["sae", "pca"]


def test_fd_table_rows_equal_single_evaluations(root, capsys):
    out = root / "t1"
    assert main(["eval", "fd", str(root / "sweep"), str(root / "sae"), str(root / "pca"),
                 "--n", "60", "--steps", "4", "--steps-list", "1,4", "--pca-k", "3",
                 "--out", str(out), "--quiet"]) == 0
    table = json.loads((out / "table1.json").read_text())
    assert "table1.md" in capsys.readouterr().out
    by = {r["method"]: r for r in table["rows"]}
    assert set(by) == {"SAE k=4, 32 latents", "PCA k=3", "GLP d1, 0.0M params",
                       "GLP d2, 0.0M params"}
    val, train_ = ActivationStore.open(str(root / "val")), ActivationStore.open(str(root / "train"))
    ident = evaluate_fd(Identity(), val_store=val, train_store=train_, n=60, progress=False)
    assert table["fd_lower_bound"] == pytest.approx(ident["fd"], rel=1e-12)
    pca = evaluate_fd(PCAReconstruction(PCA.load(root / "pca"), 3), val_store=val,
                      train_store=train_, n=60, progress=False)
    assert by["PCA k=3"]["fd"] == pytest.approx(pca["fd"], rel=1e-9)
    for run in ("d1-a1280-s0", "d2-a1280-s0"):
        own = json.loads((root / "sweep" / run / "evals" / "fd.json").read_text())
        row = next(r for r in table["rows"] if r.get("path", "").endswith(run))
        assert row["fd"] == own["fd"] and set(map(int, row["fd_by_steps"])) == {1, 4}
    md = (out / "table1.md").read_text()
    assert "lower bound" in md and "PCA k=3" in md and "GLP d2" in md


def test_recon_table_matches_sklearn_r2(root):
    out = root / "rc"
    assert main(["eval", "recon", str(root / "pca"), str(root / "sae"), "--n", "60",
                 "--pca-k", "3", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "recon.json").read_text())
    val = ActivationStore.open(str(root / "val"))
    rows = val.read_rows(reference_rows(val, 60, seed=0)[0])
    want = r2_score(rows, PCAReconstruction(PCA.load(root / "pca"), 3)(rows),
                    multioutput="variance_weighted")
    assert res["methods"]["PCA k=3"]["explained_variance"] == pytest.approx(want, rel=1e-6)
    assert res["n_rows"] == 60


def test_depth_trend_against_scipy():
    depths, fd = [4, 1, 2, 8], [0.5, 0.9, 0.7, 0.45]
    t = depth_trend(depths, fd)
    assert t["monotone_decreasing"] is True
    assert t["spearman_rho"] == pytest.approx(spearmanr(depths, fd).statistic)
    assert depth_trend([1, 2, 4], [0.9, 0.95, 0.5])["monotone_decreasing"] is False


def test_sample_refuses_an_sae_run(root, capsys, tmp_path):
    code = main(["sample", str(root / "sae"), "--out", str(tmp_path / "x.npy")])
    assert code == 2 and "SAE run" in capsys.readouterr().err


def test_random_reference_is_seeded_and_labelled(root):
    val = ActivationStore.open(str(root / "val"))
    idx, info = reference_rows(val, 120, seed=5, reference="random")
    again, _ = reference_rows(val, 120, seed=5, reference="random")
    np.testing.assert_array_equal(idx, again)
    assert info["selection"] == "random rows (as asked)" and len(np.unique(idx)) == 120
    # more rows than documents: impossible for one token per document
    assert len(set(val.doc_ids(idx).tolist())) < 120
    with pytest.raises(Exception, match="reference must be one of"):
        reference_rows(val, 10, reference="sometimes")


def test_explicit_stores_for_targets_without_a_run(root, tmp_path):
    """A PCA folder alone names no stores: --train-store/--val-store supply them."""
    out = tmp_path / "t"
    args = ["eval", "fd", str(root / "pca"), "--n", "60", "--pca-k", "3", "--out", str(out),
            "--quiet"]
    assert main(args) == 2  # no run among the targets, no stores given: a clear error
    assert main([*args, "--train-store", str(root / "train"), "--val-store",
                 str(root / "val")]) == 0
    got = json.loads((out / "table1.json").read_text())["rows"][0]["fd"]
    val, train_ = ActivationStore.open(str(root / "val")), ActivationStore.open(str(root / "train"))
    want = evaluate_fd(PCAReconstruction(PCA.load(root / "pca"), 3), val_store=val,
                       train_store=train_, n=60, progress=False)["fd"]
    assert got == pytest.approx(want, rel=1e-12)
    assert main(["eval", "recon", str(root / "pca"), "--n", "60", "--pca-k", "3", "--out",
                 str(out), "--val-store", str(root / "val"), "--quiet"]) == 0


def test_massive_rows_are_left_out_and_recorded():
    from glp_jax.evals.fd import _drop_massive

    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, D)).astype(np.float32)
    x[17] *= 200.0  # one "massive activation"
    kept, info = _drop_massive(x, {"rows": 500}, 10.0)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    assert len(kept) == 499 and info["rows"] == 499
    assert info["dropped_massive"]["rows"] == 1
    assert info["dropped_massive"]["norms"] == pytest.approx([norms[17]])
    assert info["dropped_massive"]["median_norm"] == pytest.approx(np.median(norms))
    np.testing.assert_array_equal(kept, np.delete(x, 17, axis=0))


def test_fd_table_without_massive_rows_keeps_ordinary_stores_unchanged(root):
    out = root / "t1m"
    common = dict(n=60, steps=4, steps_list=(4,), pca_k=3, progress=False)
    from glp_jax.evals.tables import fd_table

    plain = fd_table([root / "sweep", root / "pca"], **common)
    robust = fd_table([root / "sweep", root / "pca"], **common, drop_massive=10.0,
                      out_dir=out, name="table1_no_massive")
    assert robust["fd_lower_bound"] == pytest.approx(plain["fd_lower_bound"], rel=1e-12)
    assert [r["fd"] for r in robust["rows"]] == pytest.approx([r["fd"] for r in plain["rows"]])
    assert robust["dropped_massive"]["val"]["rows"] == 0
    assert (out / "table1_no_massive.json").is_file()
    # the variant's per-run files go to their own folder, never over the protocol's
    assert (root / "sweep" / "d1-a1280-s0" / "evals" / "table1_no_massive" / "fd.json").is_file()
