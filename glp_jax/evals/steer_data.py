"""Texts for sentiment steering: the DiffMean sets (positive, negative) and neutral prompts.

Embedded default (offline; the original used SST-5 for the direction and 100 OpenWebText
neutral prefixes, neither of which ships here): the fortune corpus, scored by VADER.
- Each fortune is cleaned first: a trailing attribution line ("\\t\\t-- Author") is dropped
  (its last token would otherwise be a name, and DiffMean reads the last token), whitespace
  is collapsed, duplicates are removed.
- Direction sets: fortunes of <= 150 characters (short texts: the last token is closer to
  the sentiment; on SmolLM2 layer 14 a held-out AUC of the projection on w of 0.78 vs 0.71
  with <= 400 characters, and DiffMean costs 2-3x less); positive = the `n_direction` highest VADER
  compound scores with compound >= 0.5, negative = the `n_direction` lowest with compound
  <= -0.5. The two are disjoint by construction.
- Prompts: fortunes whose compound is within +-0.05 (neutral), with >= `prompt_words` + 4
  words, truncated to their first `prompt_words` (10) words; a prefix that VADER still
  scores non-zero is skipped. Neutral fortunes are disjoint from both direction sets (|c| <
  0.5). `n_prompts` of them are drawn with a seeded permutation (numpy default_rng(seed)).
  The rest of each prompt's fortune (" " + its remaining words) is kept as the prompt's REAL
  continuation (`continuations`): the fluency judge's "as fluent as real text" anchor.
Fortunes the GLP was trained on may appear here: steering asks how edits at the last
position read, not whether the texts were held out.

A user's own sets: `pos=`, `neg=`, `prompts=` given as lists of strings or file paths: a
`.jsonl` file (one {"text": ...} object a line) or any other text file (one text a line,
blank lines skipped). User prompts are used as they are (not truncated); `continuations=`
(same formats, one per prompt, in order) gives their real continuations, else the fluency
judge calibrates on held-out fortunes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError

DIRECTION_THRESHOLD, NEUTRAL_THRESHOLD = 0.5, 0.05
DEFAULT_N_DIRECTION, DEFAULT_PROMPT_WORDS, MAX_DIRECTION_CHARS = 256, 10, 150
_ATTRIBUTION = re.compile(r"\n\s*--\s.*\Z", re.DOTALL)


@dataclass
class SteerTexts:
    pos: list[str]
    neg: list[str]
    prompts: list[str]
    source: dict = field(default_factory=dict)
    continuations: list[str] | None = None  # the real continuation of each prompt


_ANALYZER = None


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score in [-1, 1] of each text (float64)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return np.array([_ANALYZER.polarity_scores(t)["compound"] for t in texts], np.float64)


def clean_fortune(text: str) -> str:
    return " ".join(_ATTRIBUTION.sub("", text).split())


def read_texts(spec) -> list[str]:
    """Texts from a list of strings, a .jsonl file ({"text": ...} a line) or a text file (one
    text a line)."""
    if spec is None:
        raise GLPError("no texts given")
    if not isinstance(spec, str | Path):
        texts = [str(t) for t in spec]
    else:
        path = Path(spec)
        if not path.is_file():
            raise GLPError(f"text file {path} not found (give one text a line, or JSONL with a "
                           f"'text' field)")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if path.suffix == ".jsonl":
            texts = []
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise GLPError(f"{path}:{lineno}: expected a JSON object with a 'text' "
                                   f"field ({e})") from e
        else:
            texts = lines
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise GLPError(f"{spec if isinstance(spec, str | Path) else 'the list'} holds no texts")
    return texts


def fortune_steer_texts(*, n_prompts: int, n_direction: int = DEFAULT_N_DIRECTION,
                        prompt_words: int = DEFAULT_PROMPT_WORDS, seed: int = 0) -> SteerTexts:
    """The embedded default (module docstring)."""
    from glp_jax.data.corpus import open_corpus

    corpus = open_corpus("fortune")
    seen, docs = set(), []
    for d in corpus.split("all", seed=42):
        t = clean_fortune(d.text)
        if t and t not in seen:
            seen.add(t)
            docs.append(t)
    score = vader_compound(docs)
    short = np.array([len(t) <= MAX_DIRECTION_CHARS for t in docs])
    order = np.argsort(-score, kind="stable")
    pos = [docs[i] for i in order if short[i] and score[i] >= DIRECTION_THRESHOLD][:n_direction]
    neg = [docs[i] for i in order[::-1]
           if short[i] and score[i] <= -DIRECTION_THRESHOLD][:n_direction]
    cands = [i for i in range(len(docs)) if abs(score[i]) <= NEUTRAL_THRESHOLD
             and len(docs[i].split()) >= prompt_words + 4]
    prompts, conts = [], []
    for i in np.random.default_rng(seed).permutation(len(cands)):
        words = docs[cands[i]].split()
        prefix = " ".join(words[:prompt_words])
        if vader_compound([prefix])[0] == 0.0:
            prompts.append(prefix)
            conts.append(" " + " ".join(words[prompt_words:]))
            if len(prompts) == n_prompts:
                break
    if len(prompts) < n_prompts:
        raise GLPError(f"only {len(prompts)} neutral fortune prefixes available; ask for fewer "
                       f"prompts")
    return SteerTexts(pos, neg, prompts, {
        "corpus": corpus.name, "scorer": "vader compound", "n_fortunes": len(docs),
        "pos": f"top {len(pos)} with compound >= {DIRECTION_THRESHOLD}, <= "
               f"{MAX_DIRECTION_CHARS} chars",
        "neg": f"bottom {len(neg)} with compound <= -{DIRECTION_THRESHOLD}, <= "
               f"{MAX_DIRECTION_CHARS} chars",
        "prompts": f"{len(prompts)} neutral (|compound| <= {NEUTRAL_THRESHOLD}) fortunes, "
                   f"first {prompt_words} words, seed {seed}",
        "pos_compound_mean": float(np.mean(vader_compound(pos))) if pos else None,
        "neg_compound_mean": float(np.mean(vader_compound(neg))) if neg else None,
        "continuations": "the rest of each prompt's fortune",
    }, conts)


def steer_texts(pos=None, neg=None, prompts=None, *, n_prompts: int,
                n_direction: int = DEFAULT_N_DIRECTION, prompt_words: int = DEFAULT_PROMPT_WORDS,
                seed: int = 0, continuations=None) -> SteerTexts:
    """The user's sets where given, the fortune default for the rest. `pos` and `neg` go
    together. User prompts beyond `n_prompts` are dropped (the first n_prompts kept), and
    so are their `continuations` (one per prompt; only with user prompts)."""
    if (pos is None) != (neg is None):
        raise GLPError("give both the positive and the negative texts (pos= and neg=), or "
                       "neither for the fortune default")
    if continuations is not None and prompts is None:
        raise GLPError("continuations= belong to the user's prompts= (the fortune prompts "
                       "bring their own): give prompts= too")
    default = None
    if pos is None or prompts is None:
        default = fortune_steer_texts(n_prompts=n_prompts, n_direction=n_direction,
                                      prompt_words=prompt_words, seed=seed)
    source = dict(default.source) if default else {}
    if pos is not None:
        p, n = read_texts(pos), read_texts(neg)
        source.update(pos=_describe(pos, len(p)), neg=_describe(neg, len(n)))
        source.pop("pos_compound_mean", None)
        source.pop("neg_compound_mean", None)
    else:
        p, n = default.pos, default.neg
    conts = None
    if prompts is not None:
        all_prompts = read_texts(prompts)
        pr = all_prompts[:n_prompts]
        source["prompts"] = _describe(prompts, len(pr))
        source.pop("continuations", None)
        if continuations is not None:
            c = read_texts(continuations)
            if len(c) != len(all_prompts):
                raise GLPError(f"{len(c)} continuations for {len(all_prompts)} prompts: give "
                               f"one real continuation per prompt, in the same order")
            conts = [t if t[:1].isspace() else " " + t for t in c[:n_prompts]]
            source["continuations"] = _describe(continuations, len(conts))
    else:
        pr, conts = default.prompts, default.continuations
    if not p or not n:
        raise GLPError("DiffMean needs at least one positive and one negative text")
    return SteerTexts(p, n, pr, source, conts)


def _describe(spec, n: int) -> str:
    return f"{n} texts from {spec}" if isinstance(spec, str | Path) else f"{n} given texts"
