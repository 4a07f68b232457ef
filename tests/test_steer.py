"""On-manifold steering on the real SmolLM2 (layer 14), few prompts and few tokens: the edit
touches exactly the last position of each forward, r = 0 is free, batching with left padding
changes nothing, and the direction, fluency NLL, concept score and CIs equal independent
computations; the fluency judge ranks real text > shuffled words > repeated tokens > random
tokens on held-out fortunes; every method has an r = 0 arm; the calibrated range and the
steering finding decide on it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import bootstrap, spearmanr

from glp_jax.errors import GLPError
from glp_jax.evals.fluency import (
    FluencyJudge,
    continuation_ids,
    fluency_scores,
    fortune_reference_pairs,
    random_continuations,
    repeated_ngram_fraction,
)
from glp_jax.evals.steer import (
    CALIBRATED_TOP,
    DEFAULT_RS,
    SCORE_R_RANGE,
    bootstrap_ci,
    calibrated_rs,
    concept_scores,
    diffmean_direction,
    evaluate_steering,
    mean_activation_norm,
    saturation_coefficient,
    steer_run,
)
from glp_jax.evals.steer_data import read_texts, steer_texts, vader_compound
from glp_jax.llm.extract import tokenize_documents
from glp_jax.llm.generate import (
    LastPositionEdit,
    continuation_nll,
    greedy_generate,
    left_pad,
)
from glp_jax.llm.last_token import last_token_activations
from glp_jax.reproduce import findings

LAYER, NEW = 14, 6
PROMPTS = ["The weather report for tomorrow says that", "I opened the door and",
           "Q: What is the capital of France? A:"]  # unequal lengths: left padding matters
POS = ["What a wonderful, happy day!", "I love this, it is great.", "Such a joy to see you."]
NEG = ["This is awful and sad.", "I hate it, terrible.", "What a horrible, painful loss."]
REAL = [" rain, with a chance of sun in the afternoon.", " saw my neighbour on the steps.",
        " Paris."]  # real continuations of PROMPTS: the fluency judge's anchor


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The LLM in one thread while this module runs (restored after): on the shared 2-core
    box, two OpenMP threads wait on each other and small forwards run ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ids(smollm2):
    out = tokenize_documents(smollm2.tokenizer, PROMPTS, 64)
    assert len({len(t) for t in out}) == len(out)
    return out


@pytest.fixture(scope="module")
def w(smollm2):
    return diffmean_direction(smollm2, LAYER, POS, NEG)[0]


@pytest.fixture(scope="module")
def unsteered(smollm2, ids):
    return greedy_generate(smollm2, ids, max_new_tokens=NEW, batch_size=len(ids)).tokens


def test_edit_touches_only_the_last_position_of_each_forward(smollm2, ids, w):
    """Layer output before the edit vs the hidden state entering layer 15: they differ by
    alpha*w exactly at column -1 (the last prompt token at prefill; the single new position
    under the KV cache), nowhere else."""
    blocks = smollm2.model.model.layers
    pre, post = [], []
    h1 = blocks[LAYER].register_forward_hook(
        lambda _m, _i, o: pre.append((o[0] if isinstance(o, tuple) else o).clone()))
    h2 = blocks[LAYER + 1].register_forward_pre_hook(lambda _m, a: post.append(a[0].clone()))
    alphas = np.array([3.0, -5.0, 8.0], np.float32)
    edit = LastPositionEdit(w)
    try:
        gen = greedy_generate(smollm2, ids, max_new_tokens=NEW, batch_size=3, layer=LAYER,
                              edit=edit, alphas=alphas, stop_at_eos=False)
    finally:
        h1.remove()
        h2.remove()
    width = max(len(t) for t in ids)
    assert edit.widths == [width] + [1] * (NEW - 1) == [p.shape[1] for p in pre]
    assert edit.calls == NEW and all(len(t) == NEW for t in gen.tokens)
    order = np.argsort([-len(t) for t in ids], kind="stable")  # rows are batched longest first
    want = torch.from_numpy(alphas[order][:, None] * w[None])
    for a, b in zip(pre, post, strict=True):
        diff = b - a
        assert torch.equal(diff[:, :-1], torch.zeros_like(diff[:, :-1]))
        torch.testing.assert_close(diff[:, -1], want, rtol=0, atol=1e-5)


def test_r0_without_projection_reproduces_unsteered_greedy_generation(smollm2, ids, w,
                                                                      unsteered):
    edit = LastPositionEdit(w)
    zero = greedy_generate(smollm2, ids, max_new_tokens=NEW, batch_size=3, layer=LAYER,
                           edit=edit, alphas=[0.0] * len(ids))
    assert zero.tokens == unsteered and edit.calls > 0
    # and the loop is HF's greedy decoding: one unpadded prompt through model.generate
    with torch.inference_mode():
        hf = smollm2.model.generate(torch.tensor([ids[0]]), attention_mask=torch.ones(
            1, len(ids[0]), dtype=torch.long), max_new_tokens=NEW, do_sample=False,
            pad_token_id=smollm2.tokenizer.pad_token_id)
    assert hf[0, len(ids[0]):].tolist()[: len(unsteered[0])] == unsteered[0]


def test_batched_left_padding_equals_one_prompt_at_a_time(smollm2, ids, w, unsteered):
    single = [greedy_generate(smollm2, [t], max_new_tokens=NEW).tokens[0] for t in ids]
    assert single == unsteered
    alphas = [20.0, 30.0, 40.0]
    batched = greedy_generate(smollm2, ids, max_new_tokens=NEW, batch_size=3, layer=LAYER,
                              edit=LastPositionEdit(w), alphas=alphas).tokens
    one = [greedy_generate(smollm2, [t], max_new_tokens=NEW, layer=LAYER,
                           edit=LastPositionEdit(w), alphas=[a]).tokens[0]
           for t, a in zip(ids, alphas, strict=True)]
    assert batched == one
    assert batched != unsteered  # the edit is strong enough to change something


def test_left_pad_aligns_rows_right():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(GLPError):
        left_pad([[1], []], 0)


def test_diffmean_direction_is_unit_norm_and_matches_numpy(smollm2, w):
    acts = last_token_activations(smollm2, LAYER, POS + NEG)["resid"].astype(np.float64)
    d = acts[:3].mean(0) - acts[3:].mean(0)
    want = d / (np.linalg.norm(d) + 1e-8)
    assert w.dtype == np.float32 and w.shape == (smollm2.d,)
    assert abs(np.linalg.norm(w.astype(np.float64)) - 1.0) < 1e-6
    np.testing.assert_allclose(w, want, rtol=0, atol=1e-6)


def test_fluency_nll_matches_an_independent_cross_entropy(smollm2, ids, unsteered):
    got = continuation_nll(smollm2, ids, unsteered, batch_size=2)
    for p, c, g in zip(ids, unsteered, got, strict=True):
        x = torch.tensor([p + c])
        with torch.inference_mode():
            logits = smollm2.model(input_ids=x).logits[0]
        ce = F.cross_entropy(logits[len(p) - 1:-1].double(), x[0, len(p):])
        assert abs(float(ce) - g) < 1e-4
    assert (got > 0).all()


def test_vader_concept_score_on_a_known_string():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    s = "What a wonderful, happy day. I love it!"
    want = SentimentIntensityAnalyzer().polarity_scores(s)["compound"]
    assert vader_compound([s])[0] == want > 0.5
    np.testing.assert_array_equal(concept_scores([s, "Terrible."], "negative"),
                                  -vader_compound([s, "Terrible."]))


def test_bootstrap_ci_is_reproducible_and_is_scipys_percentile_interval():
    x = np.random.default_rng(3).normal(size=17)
    a, b = bootstrap_ci(x, seed=5), bootstrap_ci(x, seed=5)
    assert a == b and a[0] < x.mean() < a[1]
    ref = bootstrap((x,), np.mean, method="percentile", n_resamples=9999,
                    rng=np.random.default_rng(5)).confidence_interval
    assert a == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert bootstrap_ci(x, seed=6) != a
    assert bootstrap_ci([2.0, 2.0]) == (2.0, 2.0)


def test_default_texts_are_disjoint_neutral_and_user_files_are_read(tmp_path):
    t = steer_texts(n_prompts=5, n_direction=20)
    assert len(t.pos) == len(t.neg) == 20 and len(t.prompts) == 5
    assert not set(t.pos) & set(t.neg)
    assert (vader_compound(t.pos) >= 0.5).all() and (vader_compound(t.neg) <= -0.5).all()
    assert (vader_compound(t.prompts) == 0).all()
    assert all(len(p.split()) == 10 for p in t.prompts)
    assert not set(t.prompts) & (set(t.pos) | set(t.neg))
    assert steer_texts(n_prompts=5, n_direction=20).prompts == t.prompts  # seeded
    # each prompt's real continuation is the rest of its fortune
    assert len(t.continuations) == 5 and all(c.startswith(" ") and len(c.split()) >= 4
                                             for c in t.continuations)
    (tmp_path / "p.txt").write_text("good\n\n great \n")
    (tmp_path / "n.jsonl").write_text('{"text": "bad"}\n{"text": "awful", "label": 0}\n')
    assert read_texts(tmp_path / "p.txt") == ["good", "great"]
    u = steer_texts(str(tmp_path / "p.txt"), tmp_path / "n.jsonl", n_prompts=2,
                    n_direction=5)
    assert u.pos == ["good", "great"] and u.neg == ["bad", "awful"] and len(u.prompts) == 2
    with pytest.raises(GLPError, match="one real continuation per prompt"):
        steer_texts(["good"], ["bad"], prompts=["a b", "c d"], continuations=["e"],
                    n_prompts=2)
    v = steer_texts(["good"], ["bad"], prompts=["a b", "c d"], continuations=["e", " f"],
                    n_prompts=1)
    assert v.prompts == ["a b"] and v.continuations == [" e"]
    with pytest.raises(GLPError, match="both"):
        steer_texts(["x"], None, n_prompts=2)
    with pytest.raises(GLPError, match="not found"):
        read_texts(tmp_path / "missing.txt")


def _random_glp(d):
    from flax import nnx

    from glp_jax.api import LoadedGLP
    from glp_jax.model import GLP, GLPConfig, Normalizer

    cfg = GLPConfig(d_input=d, n_layers=1, d_model=64, d_mlp=128).resolved()
    return LoadedGLP(GLP(cfg, rngs=nnx.Rngs(0)),
                     Normalizer.from_moments(np.zeros(d), np.full(d, 25.0)), cfg, [], "random")


def test_evaluate_steering_with_a_glp_is_seeded_and_scored(smollm2, w):
    from glp_jax.evals.recon import GLPProjection

    glp = _random_glp(smollm2.d)
    p_pos = []

    def clf(texts):
        p_pos.append(len(texts))
        return np.full(len(texts), 0.75)

    judge = FluencyJudge(real_nll=4.0, random_nll=15.0)  # given anchors: no reference pass

    def run():
        return evaluate_steering(
            smollm2, LAYER, w, 3.0, PROMPTS[:2],
            {"diffmean": None, "glp": GLPProjection(glp, seed=1)}, rs=(0.0, 2.0),
            negative=True, max_new_tokens=4, batch_size=8, classifier=clf, progress=False,
            fluency_judge=judge, scales={"other": 6.0})

    a, b = run(), run()
    for x in (a, b):
        x.pop("timing")
    assert json.dumps(a) == json.dumps(b)
    assert a["tasks"] == ["positive", "negative"] and set(a["steer_score"]) == {"diffmean",
                                                                                "glp"}
    rows = a["results"]["positive"]["diffmean"]
    assert [r["r"] for r in rows] == [0.0, 2.0]
    assert rows[1]["alpha"] == pytest.approx(6.0) and \
        a["results"]["negative"]["glp"][1]["alpha"] == pytest.approx(-6.0)
    # r = 0 diffmean is the unsteered generation: same concept, NLL and fluency
    u = a["unsteered"]["positive"]
    assert rows[0]["concept"] == u["concept"] and rows[0]["fluency_nll"] == u["fluency_nll"]
    assert rows[0]["fluency01"] == u["fluency01"] and rows[0]["fluency"] == u["fluency"]
    # the glp r = 0 arm: the projection alone, alpha 0, scored like every other row
    g0 = a["results"]["positive"]["glp"][0]
    assert g0["r"] == 0.0 and g0["alpha"] == 0.0 and 0.0 <= g0["fluency01"] <= 1.0
    assert rows[1]["r_by_scale"] == {"other": pytest.approx(1.0)}  # alpha 6 / unit 6
    # per-generation fluency is the judge's map of its NLL and repetition
    for gen in a["generations"]:
        assert gen["fluency"] == pytest.approx(fluency_scores(
            [gen["nll"]], [gen["repetition"]], real_nll=4.0, random_nll=15.0)[0], abs=1e-12)
    assert a["fluency_judge"]["real_nll"] == 4.0 and a["schema"] == 2
    for task in a["tasks"]:
        for m, s in a["steer_score_by_task"][task].items():
            rr = a["results"][task][m]
            assert s == rr[1]["combined01"]  # only r = 2.0 is in [1.2, 2.0]
            assert 0.0 <= s <= 1.0
    assert a["results"]["negative"]["glp"][0]["classifier"]["mean"] == pytest.approx(0.25)
    # generations: unsteered + 2 methods x 2 tasks x 2 r, 2 prompts each
    assert len(a["generations"]) == 2 + 2 * 2 * 2 * 2
    g = next(g for g in a["generations"] if g["method"] == "glp" and g["r"] == 2.0)
    assert g["compound"] == vader_compound([g["text"]])[0]
    assert a["methods"]["glp"]["sigma0"] == 0.5 and a["methods"]["diffmean"]["post"] is None


def test_steer_run_writes_reports_with_the_val_store_norm(smollm2, tmp_path):
    """A tiny GLP run (2 steps) on SmolLM2 layer-14-shaped stores; the user's texts from
    files; act_norm from the val store's rows."""
    from glp_jax.config import make_config
    from glp_jax.data.store import ActivationStore, StoreMeta
    from glp_jax.train import train

    rng = np.random.default_rng(0)
    for name, scale in (("train", 1.0), ("val", 2.0)):
        s = ActivationStore.create(tmp_path / name, StoreMeta(
            model=smollm2.model_id, layers=[LAYER], d=smollm2.d, corpus="fortune"))
        x = (scale * rng.standard_normal((64, smollm2.d))).astype(np.float32)
        s.append({LAYER: x}, np.zeros(64), np.arange(64))
    run = tmp_path / "run"
    train(make_config(dict(train_dataset=str(tmp_path / "train"),
                           val_dataset=str(tmp_path / "val"), n_layers=1, d_model=32,
                           d_mlp=64, batch_size=16, num_steps=2, use_bf16=False,
                           data_mode="repeat", log_every_n_steps=2, save_every_n_steps=2,
                           eval_rows=16, epoch_size=32, output_path=str(run),
                           progress=False)))
    norm, info = mean_activation_norm(run)
    assert info["source"] == "val store" and info["rows"] == 64
    stored = ActivationStore.open(str(tmp_path / "val")).read_range(0, 64)  # bf16 rounded
    assert norm == pytest.approx(np.linalg.norm(stored.astype(np.float64), axis=1).mean())
    centred, _ = mean_activation_norm(run, norm="centred")
    x64 = stored.astype(np.float64)
    assert centred == pytest.approx(np.linalg.norm(x64 - x64.mean(0), axis=1).mean())
    with pytest.raises(GLPError, match="norm must be one of"):
        mean_activation_norm(run, norm="median")
    (tmp_path / "pos.txt").write_text("\n".join(POS))
    (tmp_path / "neg.txt").write_text("\n".join(NEG))
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS))
    (tmp_path / "real.txt").write_text("\n".join(REAL))
    texts = dict(pos=tmp_path / "pos.txt", neg=tmp_path / "neg.txt",
                 prompts=tmp_path / "prompts.jsonl", continuations=tmp_path / "real.txt")
    out = tmp_path / "out"
    r = steer_run(run, rs=(0.4, 1.2), n_prompts=2, max_new_tokens=3, seed=4, **texts,
                  out_dir=out, lm=smollm2, progress=False)
    assert r["prompts"] == PROMPTS[:2] and r["act_norm"]["value"] == pytest.approx(norm)
    assert set(r["steer_score"]) == {"diffmean", "glp"} and r["step"] == 2
    assert r["methods"]["glp"]["step"] == 2 and r["direction"]["n_pos"] == 3
    saved = json.loads((out / "steer.json").read_text())
    assert saved["steer_score"] == r["steer_score"] and saved["act_norm"]["source"] == "val store"
    md = (out / "steer.md").read_text()
    assert "| diffmean | 1.2 |" in md and "| glp | 0.4 |" in md
    assert (out / "steer_pareto.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(GLPError, match="unknown steering method"):
        steer_run(run, methods=("sae",), lm=smollm2, write=False)
    # r x the raw DiffMean norm: the files take the variant's name
    rel = steer_run(run, rs=(1.0,), n_prompts=1, max_new_tokens=2, seed=4,
                    pos=tmp_path / "pos.txt", neg=tmp_path / "neg.txt",
                    prompts=tmp_path / "prompts.jsonl", out_dir=out, lm=smollm2,
                    progress=False, norm="diffmean", name="steer_rel", methods=("diffmean",),
                    zero_arm=False, continuations=tmp_path / "real.txt")
    assert rel["act_norm"]["value"] == rel["direction"]["raw_norm"]
    assert rel["results"]["positive"]["diffmean"][0]["alpha"] == pytest.approx(
        rel["direction"]["raw_norm"])
    assert (out / "steer_rel.json").is_file() and (out / "steer_rel_pareto.png").is_file()
    # every method has an r = 0 arm; every row states alpha on both scales
    for m in ("diffmean", "glp"):
        rows = r["results"]["positive"][m]
        assert [x["r"] for x in rows] == [0.0, 0.4, 1.2] and rows[0]["alpha"] == 0.0
    assert r["fluency_judge"]["source"] == "the real continuations of the 2 prompts"
    assert r["scales"] == {"mean": pytest.approx(norm),
                           "diffmean": pytest.approx(r["direction"]["raw_norm"])}
    x = r["results"]["positive"]["glp"][2]
    assert x["r_by_scale"]["diffmean"] == pytest.approx(x["alpha"] / r["direction"]["raw_norm"])
    assert x["r_by_scale"]["mean"] == pytest.approx(1.2)
    assert "| r (diffmean) |" in md and "projection/reconstruction ALONE" in md
    # the calibrated range: DiffMean's saturation on a 3-point search, the grid rescaled
    cal = steer_run(run, rs=(1.0, 2.0), n_prompts=2, max_new_tokens=2, seed=4, **texts,
                    out_dir=out, lm=smollm2, progress=False, norm="diffmean", calibrate=True,
                    calibration_rs=(1.0, 16.0), name="steer_cal")
    c = cal["calibration"]
    assert [s["r"] for s in c["search"]] == [1.0, 16.0] and c["r_saturation"] in (1, 16)
    assert c["unit"] == cal["act_norm"]["value"] == cal["direction"]["raw_norm"]
    k = c["r_saturation"] / CALIBRATED_TOP
    assert [x["r"] for x in cal["results"]["positive"]["glp"]] == pytest.approx([0, k, 2 * k])
    assert cal["steer_score_r_range"] == pytest.approx([1.2 * k, 2 * k])
    assert cal["steer_score"]["glp"] == cal["results"]["positive"]["glp"][2]["combined01"]
    assert "Calibrated range" in (out / "steer_cal.md").read_text()
    for m in ("diffmean", "glp"):  # the finding recomputes the rows from the generations
        c01, f01 = findings.steering_points(cal, m)
        rows = cal["results"]["positive"][m]
        assert c01 == pytest.approx([x["concept01"] for x in rows], abs=1e-12)
        assert f01 == pytest.approx([x["fluency01"] for x in rows], abs=1e-12)
    with pytest.raises(GLPError, match="calibrate again"):
        steer_run(run, n_prompts=2, max_new_tokens=2, **texts, lm=smollm2, progress=False,
                  calibrate=True, calibration={**c, "unit": 1.0}, write=False)
    # finding 5 decides on the calibrated scale, the spec's mean norm beside it
    f = findings.finding_steering({"mean": r, "diffmean": cal})
    _, lo, hi = findings.pareto_diff_ci(cal, "glp", "diffmean")
    assert f.verdict == findings.side_of_zero(lo, hi, want="positive")
    assert "diffmean scale, calibrated" in f.deciding and "not deciding: spec" in f.deciding
    assert any(n.startswith("Cost of the projection itself (glp at r = 0") for n in f.notes)
    assert sum(line.startswith("| calibrated, DiffMean norm") for line in f.table) == 3
    assert sum(line.startswith("| spec, mean norm") for line in f.table) == 3


def test_default_rs_and_bad_arguments(smollm2, w):
    assert DEFAULT_RS == (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
    with pytest.raises(GLPError, match="non-negative"):
        evaluate_steering(smollm2, LAYER, w, 3.0, PROMPTS, {"diffmean": None}, rs=(-1.0,),
                          progress=False)
    with pytest.raises(GLPError, match="act_norm"):
        evaluate_steering(smollm2, LAYER, w, 0.0, PROMPTS, {"diffmean": None}, progress=False)


# -- the fluency judge ---------------------------------------------------------------------

def test_fluency_map_repetition_and_random_tokens(smollm2):
    assert repeated_ngram_fraction([1, 2, 3, 4]) == 0.0 == repeated_ngram_fraction([7])
    assert repeated_ngram_fraction([5] * 9) == pytest.approx(1 - 1 / 8)
    assert repeated_ngram_fraction([1, 2, 1, 2, 1, 2]) == pytest.approx(1 - 2 / 5)
    f = fluency_scores([4.0, 15.0, 9.5, 1.0, 20.0, 4.0], [0, 0, 0, 0, 0, 0.5],
                       real_nll=4.0, random_nll=15.0)
    np.testing.assert_allclose(f, [1.0, 0.0, 0.5, 1.0, 0.0, 0.5])  # clipped, penalised
    with pytest.raises(GLPError, match="NLL_random > NLL_real"):
        FluencyJudge(real_nll=5.0, random_nll=5.0)
    assert FluencyJudge(4.0, 15.0).score([9.5], [[1, 2, 3]]) == pytest.approx([0.5])
    tok = smollm2.tokenizer
    a, b = (random_continuations(tok, [50, 3], seed=s) for s in (1, 1))
    assert a == b and [len(x) for x in a] == [50, 3]
    assert not set(a[0]) & set(tok.all_special_ids) and max(a[0]) < len(tok)
    assert random_continuations(tok, [50], seed=2)[0] != a[0]
    # prompts without real continuations: anchors from held-out fortunes
    ref = FluencyJudge.fortune_reference(smollm2, max_tokens=4, n=4)
    assert ref.source.startswith("4 held-out fortunes") and len(ref.reference_nll["real"]) == 4
    assert ref.real_nll < ref.random_nll and ref.to_dict()["n_references"] == 4


def test_fluency_judge_ranks_real_over_shuffled_over_repeated_over_random(smollm2):
    """24 held-out fortunes (6-word prompts, <= 10-token continuations) under the real
    SmolLM2, the judge calibrated on these prompts' real continuations (as in steering):
    real text > its words shuffled > its first 3 tokens looped > random tokens, by the mean
    score and by rank (Spearman vs the category order; each pair's AUC)."""
    from sklearn.metrics import roc_auc_score

    from glp_jax.llm.extract import tokenize_documents

    n, length = 24, 10
    prompts, conts = fortune_reference_pairs(n, prompt_words=6, seed=1)
    tok = smollm2.tokenizer
    pids = tokenize_documents(tok, prompts, 64)
    real = continuation_ids(tok, conts, length)
    judge = FluencyJudge.calibrate(smollm2, pids, real, seed=0)
    rng = np.random.default_rng(0)
    shuffled = continuation_ids(
        tok, [" " + " ".join(rng.permutation(c.split())) for c in conts], length)
    looped = [(c[:3] * length)[:len(c)] for c in real]
    out = judge.judge(smollm2, pids * 2, shuffled + looped)
    scores = {"real": judge.score(judge.reference_nll["real"], real),
              "shuffled": out["fluency"][:n], "repeated": out["fluency"][n:],
              # the calibration's random tokens (their NLLs are known; no repetition)
              "random": judge.score(judge.reference_nll["random"], [[0]] * n)}
    means = [float(v.mean()) for v in scores.values()]
    print("fluency judge means (real, shuffled, repeated, random):",
          [round(m, 3) for m in means], "anchors", judge.to_dict())
    assert means == sorted(means, reverse=True) and len(set(means)) == 4
    assert means[0] > 0.85 and means[-1] < 0.1
    order = np.repeat([3, 2, 1, 0], n)
    assert spearmanr(order, np.concatenate(list(scores.values()))).statistic > 0.85
    cats = list(scores.values())
    for better, worse in zip(cats[:-1], cats[1:], strict=True):
        auc = roc_auc_score(np.r_[np.ones(n), np.zeros(n)], np.r_[better, worse])
        assert auc > 0.85
    assert judge.real_nll < float(out["nll"][:n].mean()) < judge.random_nll  # shuffled


# -- the calibrated coefficient range --------------------------------------------------------

def test_saturation_coefficient_and_the_calibrated_grid():
    rs = [0.5, 1, 2, 4, 8, 16]
    c = [0.20, 0.22, 0.30, 0.50, 0.52, 0.10]  # rises, saturates, collapses
    s = saturation_coefficient(rs, c, baseline=0.2)
    # best gain 0.32 at r = 8; 90% of it (0.488) is first reached at r = 4
    assert (s["r_saturation"], s["r_best"]) == (4.0, 8.0)
    assert s["gain"] == pytest.approx(0.32) and s["concept01_at_saturation"] == 0.5
    assert saturation_coefficient(rs[::-1], c[::-1], baseline=0.2) == s  # order-free
    assert saturation_coefficient(rs, c, 0.2, saturation=1.0)["r_saturation"] == 8.0
    # a concept spike from broken text (fluency below the floor) is not counted
    spike, flu = [0.2, 0.2, 0.3, 0.4, 0.9, 0.2], [0.9, 0.9, 0.9, 0.9, 0.3, 0.1]
    assert saturation_coefficient(rs, spike, 0.2)["r_saturation"] == 8.0
    floored = saturation_coefficient(rs, spike, 0.2, fluency01=flu, min_fluency01=0.45)
    assert floored["r_saturation"] == 4.0 and floored["eligible"] == [0.5, 1, 2, 4]
    assert floored["fluent_search"] and floored["gain"] == pytest.approx(0.2)
    broken = saturation_coefficient(rs, spike, 0.2, fluency01=flu, min_fluency01=0.95)
    assert not broken["fluent_search"] and broken["r_saturation"] == 8.0  # all counted
    # per prompt: the best gain must be significant, else the largest eligible r
    base_p = np.zeros(6)
    clear = np.tile(np.array(c)[:, None], (1, 6))  # every prompt gains the same
    sig = saturation_coefficient(rs, c, 0.0, concept_by_prompt=clear,
                                 baseline_by_prompt=base_p, fluency01=flu,
                                 min_fluency01=0.25)  # eligible: r <= 8
    assert sig["significant"] and sig["gain_ci"][0] > 0 and sig["r_saturation"] == 4.0
    noisy = clear * np.array([1, -1, 1, -1, 1, -1])  # gains cancel over prompts
    ns = saturation_coefficient(rs, c, 0.0, concept_by_prompt=noisy,
                                baseline_by_prompt=base_p, fluency01=flu, min_fluency01=0.25)
    assert not ns["significant"] and ns["gain_ci"][0] <= 0 < ns["gain_ci"][1]
    assert ns["r_saturation"] == 8.0 == max(ns["eligible"])  # the edge of fluent text
    none = saturation_coefficient([1, 2], [0.1, 0.05], baseline=0.2)
    assert none["gain"] < 0 and none["r_saturation"] == 2.0  # no effect: the grid's top
    with pytest.raises(GLPError, match="saturation"):
        saturation_coefficient(rs, c, 0.2, saturation=0.0)
    with pytest.raises(GLPError, match="search coefficients"):
        saturation_coefficient([1.0], [0.3], 0.2)
    cal = {"r_saturation": 4.0}
    assert calibrated_rs(cal, DEFAULT_RS) == pytest.approx([0.4 * i for i in range(1, 11)])
    assert calibrated_rs(cal, [CALIBRATED_TOP]) == [4.0]
    assert calibrated_rs(cal, SCORE_R_RANGE) == pytest.approx([2.4, 4.0])
