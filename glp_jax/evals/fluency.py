"""A fluency judge for steered continuations that scores the TEXT, not its distance from the
unsteered greedy path (no hosted model; the original used gpt-4o-mini's AxBench rating).

    fluency = lm_part * (1 - repetition), in [0, 1]
    lm_part = clip((NLL_random - NLL) / (NLL_random - NLL_real), 0, 1)

- NLL: mean per-token negative log-likelihood of the continuation under the UNSTEERED LM,
  given its prompt (token ids concatenated, prompt masked: `continuation_nll`).
- Calibration, per prompt set: NLL_real = the mean NLL of REAL continuations of the same
  prompts (for the fortune prompts, the rest of the fortune each prompt was cut from; for
  prompts without one, held-out fortunes split the same way), NLL_random = the mean NLL of
  uniformly random non-special tokens of the same lengths after the same prompts. So 1 = as
  predictable as real text (anything more predictable, e.g. the unsteered greedy path, also
  scores 1), 0 = as bad as random tokens. On SmolLM2-135M (fortune prompts) NLL_real ~4.0,
  NLL_random ~15.3, greedy ~1.2 nats/token.
- Repetition: the repeated n-gram fraction of the continuation's tokens, 1 - unique n-grams
  / n-grams (n = 2). A loop has a LOW NLL (the LM predicts its own loops), so the penalty is
  what catches the "strings of commas and newlines" that strong steering produces; real
  text scores ~0.01, a 3-token loop ~0.8.
Measured on 24 held-out fortunes (tests/test_steer.py): real text > shuffled words >
repeated tokens > random tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from glp_jax.data.corpus import open_corpus
from glp_jax.errors import GLPError
from glp_jax.evals.steer_data import clean_fortune
from glp_jax.llm.generate import continuation_nll

REPETITION_N = 2
REFERENCE_DOCS, REFERENCE_PROMPT_WORDS, REFERENCE_MIN_EXTRA_WORDS = 16, 10, 4


def repeated_ngram_fraction(tokens: Sequence[int], n: int = REPETITION_N) -> float:
    """1 - unique n-grams / n-grams of one sequence (0 when it has no n-gram): 0 for text
    that never repeats a phrase, -> 1 for a loop."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def fluency_scores(nll, repetition, *, real_nll: float, random_nll: float) -> np.ndarray:
    """The judge's map (module docstring) of per-text NLLs and repetition fractions."""
    if not (np.isfinite(real_nll) and np.isfinite(random_nll)) or random_nll <= real_nll:
        raise GLPError(f"fluency calibration needs NLL_random > NLL_real, got {random_nll} "
                       f"and {real_nll}: the reference texts are not more predictable than "
                       f"random tokens (wrong LM, or empty/garbled reference continuations)")
    nll = np.asarray(nll, np.float64)
    rep = np.clip(np.asarray(repetition, np.float64), 0.0, 1.0)
    lm_part = np.clip((random_nll - nll) / (random_nll - real_nll), 0.0, 1.0)
    return lm_part * (1.0 - rep)


def random_continuations(tokenizer, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    """Uniformly random non-special token ids, one sequence of each length (seeded)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = np.setdiff1d(np.arange(len(tokenizer)), np.fromiter(special, np.int64, len(special)))
    rng = np.random.default_rng(seed)
    return [rng.choice(vocab, size=int(n)).tolist() for n in lengths]


def continuation_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of continuation strings (no special tokens; a continuation carries its own
    leading space), truncated to `max_tokens`."""
    out = [list(ids[:max_tokens]) for ids in
           tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if any(not ids for ids in out):
        raise GLPError("every reference continuation needs >= 1 token (got an empty text)")
    return out


def fortune_reference_pairs(n: int = REFERENCE_DOCS, prompt_words: int = REFERENCE_PROMPT_WORDS,
                            seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, real continuations) from HELD-OUT fortunes (the corpus's val split): the
    first `prompt_words` words, and the rest with a leading space (fortunes with at least
    `prompt_words` + 4 words, attribution lines dropped as in steer_data)."""
    docs = [clean_fortune(d.text) for d in open_corpus("fortune").split("val", seed=42)]
    docs = [d for d in docs if len(d.split()) >= prompt_words + REFERENCE_MIN_EXTRA_WORDS]
    if len(docs) < n:
        raise GLPError(f"only {len(docs)} held-out fortunes long enough for {n} reference pairs")
    pick = np.random.default_rng(seed).permutation(len(docs))[:n]
    words = [docs[i].split() for i in pick]
    return ([" ".join(w[:prompt_words]) for w in words],
            [" " + " ".join(w[prompt_words:]) for w in words])


@dataclass
class FluencyJudge:
    """fluency_scores with fixed anchors; `calibrate` measures them on an LM and references.

    `reference_nll` keeps the per-reference NLLs ({"real": [...], "random": [...]}) so the
    anchors can be checked and the references scored without another forward."""

    real_nll: float
    random_nll: float
    ngram: int = REPETITION_N
    source: str = "given"
    reference_nll: dict = field(default_factory=dict)

    def __post_init__(self):
        fluency_scores([], [], real_nll=self.real_nll, random_nll=self.random_nll)

    @classmethod
    def calibrate(cls, lm, prompt_ids: Sequence[Sequence[int]],
                  real_ids: Sequence[Sequence[int]], *, seed: int = 0, batch_size: int = 32,
                  source: str = "given reference continuations") -> FluencyJudge:
        """Anchors from the real continuations `real_ids` of `prompt_ids` and from random
        tokens of the same lengths after the same prompts (one forward pass for both)."""
        if len(prompt_ids) != len(real_ids) or not prompt_ids:
            raise GLPError(f"fluency calibration needs one real continuation per prompt, got "
                           f"{len(real_ids)} for {len(prompt_ids)} prompts")
        rand = random_continuations(lm.tokenizer, [len(c) for c in real_ids], seed)
        nll = continuation_nll(lm, [*prompt_ids, *prompt_ids], [*real_ids, *rand],
                               batch_size=batch_size)
        real, random = nll[:len(real_ids)], nll[len(real_ids):]
        return cls(float(real.mean()), float(random.mean()), source=source,
                   reference_nll={"real": real.tolist(), "random": random.tolist()})

    @classmethod
    def from_texts(cls, lm, prompts: Sequence[str], continuations: Sequence[str], *,
                   max_tokens: int, seed: int = 0, batch_size: int = 32,
                   prompt_max_tokens: int = 64,
                   source: str = "given reference continuations") -> FluencyJudge:
        """`calibrate` on strings: prompts tokenized as documents (separator first, as for
        steering), continuations as they are, truncated to `max_tokens`."""
        from glp_jax.llm.extract import tokenize_documents

        if len(prompts) != len(continuations):
            raise GLPError(f"{len(continuations)} reference continuations for {len(prompts)} "
                           f"prompts: give one per prompt")
        return cls.calibrate(lm, tokenize_documents(lm.tokenizer, list(prompts),
                                                    prompt_max_tokens),
                             continuation_ids(lm.tokenizer, continuations, max_tokens),
                             seed=seed, batch_size=batch_size, source=source)

    @classmethod
    def fortune_reference(cls, lm, *, max_tokens: int, n: int = REFERENCE_DOCS,
                          seed: int = 0, batch_size: int = 32) -> FluencyJudge:
        """Anchors from held-out fortunes (fortune_reference_pairs): for prompts that come
        without real continuations of their own."""
        prompts, conts = fortune_reference_pairs(n, seed=seed)
        return cls.from_texts(lm, prompts, conts, max_tokens=max_tokens, seed=seed,
                              batch_size=batch_size,
                              source=f"{n} held-out fortunes (first {REFERENCE_PROMPT_WORDS} "
                                     f"words as prompt, the rest as real continuation)")

    def repetition(self, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        return np.array([repeated_ngram_fraction(c, self.ngram) for c in continuations],
                        np.float64)

    def score(self, nll, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """Fluency in [0, 1] of continuations (token ids) whose NLLs are already known."""
        nll = np.asarray(nll, np.float64)
        if nll.shape != (len(continuations),):
            raise GLPError(f"{nll.shape} NLLs for {len(continuations)} continuations")
        return fluency_scores(nll, self.repetition(continuations), real_nll=self.real_nll,
                              random_nll=self.random_nll)

    def judge(self, lm, prompt_ids: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]], *, batch_size: int = 32) -> dict:
        """{"nll", "repetition", "fluency"} arrays of continuations under the unsteered `lm`."""
        nll = continuation_nll(lm, prompt_ids, continuations, batch_size=batch_size)
        return {"nll": nll, "repetition": self.repetition(continuations),
                "fluency": self.score(nll, continuations)}

    def to_dict(self) -> dict:
        return {"real_nll": self.real_nll, "random_nll": self.random_nll,
                "repetition_ngram": self.ngram, "source": self.source,
                "n_references": len(self.reference_nll.get("real", [])),
                "formula": "clip((NLL_random - NLL) / (NLL_random - NLL_real), 0, 1) x "
                           f"(1 - repeated {self.ngram}-gram fraction)"}
