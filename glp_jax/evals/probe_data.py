"""Binary probing tasks: texts (or cached activations), 0/1 labels and a train/test split.

Sources:
- `fortune_tasks()`: the built-in suite from the embedded corpus. One task per fortune
  category with at least `min_count` non-empty entries: that category (label 1) against an
  equal-size seeded sample of all other categories (label 0).
- `load_task_file(path)`: one user task per CSV (columns `text`, `label`; or `target` as in
  the SAE-Probes CSVs) or JSONL file (objects with `text` and `label`). Labels may be any
  two values; they are encoded like sklearn's LabelEncoder (sorted unique values -> 0, 1).
- `load_original_task(folder)`: the original release's cached-activation layout (below).

The split (`balanced_split`) follows SAE-Probes `get_train_test_indices` as the original
calls it: pos_ratio 0.5, seed 42, n_train = min(1024, N - 100), n_test = N - n_train - 1.
Our implementation of it, documented so it is reproducible anywhere:
  rng = numpy.random.default_rng(seed) (no global state);
  each class's indices are permuted once by rng (negatives first, then positives);
  train = the first floor(n_train * pos_ratio) positives (capped at n_pos - 1) and the first
  n_train - that many negatives (if negatives run short the rest come from positives), in
  an rng-shuffled order (the order matters: 5-fold CV is StratifiedKFold without shuffling);
  test = n_test of the remaining rows, as close to pos_ratio as the remaining rows allow
  (the one left-over row comes from the larger remaining class), rng-shuffled.
A balanced task therefore gets a balanced train set (exactly n_train/2 per class) and a test
set balanced to within one row. SAE-Probes' own sampler is not vendored, so on the released
tasks the individual rows may differ from the original's; sizes and balance are the same.

Original layout (one folder per task, as the `*-sae-probes` HF datasets cache them):
    TASK/X_train.pt   float tensor (N_train, 1, d) or (N_train, d): last-token residuals
    TASK/X_test.pt    (N_test, 1, d) or (N_test, d)
    TASK/y_train.pt   (N_train,) labels (any two values; or .npy)
    TASK/y_test.pt    (N_test,)
  or, without y files, the SAE-Probes CSV `TASK/TASK.csv` (or `TASK.csv` beside the folder)
  with a `target` column of N rows: labels are LabelEncoder(target) split by
  `balanced_split`, and X_train/X_test must hold the rows of that split in that order
  (only true if the cache was written with the same split: prefer y files).
All tensors are read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glp_jax.errors import GLPError

SPLIT_SEED, POS_RATIO, MAX_TRAIN, TEST_MARGIN = 42, 0.5, 1024, 100
FORTUNE_MIN_COUNT = 100


@dataclass
class ProbeTask:
    """One binary task. Either `texts` (features come from the LLM) or `acts` (cached
    last-token residuals [N, d], e.g. the original layout) is set; `train_idx`/`test_idx`
    index rows of both and of `labels`."""

    name: str
    labels: np.ndarray  # [N] int64 in {0, 1}
    train_idx: np.ndarray
    test_idx: np.ndarray
    texts: list[str] | None = None
    acts: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int64)
        self.train_idx = np.asarray(self.train_idx, np.int64)
        self.test_idx = np.asarray(self.test_idx, np.int64)
        n = len(self.labels)
        if self.texts is None and self.acts is None:
            raise GLPError(f"task {self.name}: give texts or cached activations")
        for what, v in (("texts", self.texts), ("acts", self.acts)):
            if v is not None and len(v) != n:
                raise GLPError(f"task {self.name}: {len(v)} {what} but {n} labels")
        if not set(np.unique(self.labels)) <= {0, 1}:
            raise GLPError(f"task {self.name}: labels must be 0/1 after encoding")
        for split, idx in (("train", self.train_idx), ("test", self.test_idx)):
            if len(np.unique(self.labels[idx])) < 2:
                raise GLPError(f"task {self.name}: the {split} split holds one class only")

    @property
    def y_train(self) -> np.ndarray:
        return self.labels[self.train_idx]

    @property
    def y_test(self) -> np.ndarray:
        return self.labels[self.test_idx]

    def describe(self) -> dict:
        return {"name": self.name, "n": int(len(self.labels)), "n_train": int(len(self.train_idx)),
                "n_test": int(len(self.test_idx)),
                "train_pos": int(self.y_train.sum()), "test_pos": int(self.y_test.sum()),
                "source": "texts" if self.texts is not None else "cached activations",
                **self.info}


# -- the split --------------------------------------------------------------------------------

def split_sizes(n: int) -> tuple[int, int]:
    """(n_train, n_test) = (min(1024, N - 100), N - n_train - 1), as the original."""
    n_train = min(MAX_TRAIN, n - TEST_MARGIN)
    n_test = n - n_train - 1
    if n_train < 10 or n_test < 2:
        raise GLPError(f"a task needs more than {TEST_MARGIN + 10} rows for the original split "
                       f"(n_train = min(1024, N - 100)), got N = {n}")
    return n_train, n_test


def balanced_split(labels, *, pos_ratio: float = POS_RATIO, seed: int = SPLIT_SEED,
                   n_train: int | None = None, n_test: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): class-balanced, deterministic (see the module docstring)."""
    y = np.asarray(labels)
    n = len(y)
    dn_train, dn_test = split_sizes(n)
    n_train = dn_train if n_train is None else int(n_train)
    n_test = dn_test if n_test is None else int(n_test)
    if n_train + n_test > n:
        raise GLPError(f"n_train {n_train} + n_test {n_test} > N {n}")
    rng = np.random.default_rng(seed)
    neg = rng.permutation(np.flatnonzero(y == 0))
    pos = rng.permutation(np.flatnonzero(y == 1))
    if len(pos) < 2 or len(neg) < 2:
        raise GLPError(f"need >= 2 rows of each class, got {len(pos)} positive, {len(neg)} negative")
    tp = min(int(n_train * pos_ratio), len(pos) - 1)
    tn = n_train - tp
    if tn > len(neg) - 1:
        tn = len(neg) - 1
        tp = n_train - tn
    train = rng.permutation(np.concatenate([pos[:tp], neg[:tn]]))
    rest_pos, rest_neg = pos[tp:], neg[tn:]
    sp = min(int(round(n_test * pos_ratio)), len(rest_pos))
    sn = n_test - sp
    if sn > len(rest_neg):
        sn = len(rest_neg)
        sp = n_test - sn
    test = rng.permutation(np.concatenate([rest_pos[:sp], rest_neg[:sn]]))
    return train, test


def encode_labels(values: Sequence) -> tuple[np.ndarray, list]:
    """sklearn LabelEncoder: sorted unique values -> 0..k-1; exactly two classes required."""
    classes, y = np.unique(np.asarray([str(v) for v in values]), return_inverse=True)
    if len(classes) != 2:
        raise GLPError(f"a probing task needs exactly two label values, got {len(classes)}: "
                       f"{list(classes)[:5]}")
    return y.astype(np.int64), [str(c) for c in classes]


def task_from_texts(name: str, texts: Sequence[str], labels: Sequence, *, seed: int = SPLIT_SEED,
                    info: dict | None = None) -> ProbeTask:
    """A task from (text, label) pairs: empty texts dropped, labels encoded, split balanced."""
    keep = [i for i, t in enumerate(texts) if str(t).strip()]
    texts = [str(texts[i]).strip() for i in keep]
    y, classes = encode_labels([labels[i] for i in keep])
    train, test = balanced_split(y, seed=seed)
    return ProbeTask(name, y, train, test, texts=texts,
                     info={"classes": classes, **(info or {})})


# -- the built-in suite -------------------------------------------------------------------------

def fortune_tasks(*, min_count: int = FORTUNE_MIN_COUNT, max_tasks: int | None = None,
                  max_per_task: int | None = None, seed: int = SPLIT_SEED,
                  categories: Sequence[str] | None = None) -> list[ProbeTask]:
    """One task per fortune category with >= `min_count` non-empty entries: category vs the
    rest, balanced by sampling as many negatives (seeded) as there are positives.

    Tasks come largest category first; `max_tasks` keeps the first ones. `max_per_task`
    caps a task's rows (half positive), sampled with the same seed."""
    from glp_jax.data.corpus import open_corpus

    docs = [d for d in open_corpus("fortune")._docs if d.text.strip()]
    labels = np.array([d.label for d in docs])
    cats, counts = np.unique(labels, return_counts=True)
    order = sorted((c for c, k in zip(cats, counts, strict=True) if k >= min_count),
                   key=lambda c: (-int((labels == c).sum()), c))
    if categories is not None:
        unknown = sorted(set(categories) - set(order))
        if unknown:
            raise GLPError(f"fortune categories {unknown} are unknown or have < {min_count} "
                           f"entries; usable: {order}")
        order = [c for c in order if c in set(categories)]
    if max_tasks is not None:
        order = order[:max_tasks]
    tasks = []
    for ci, cat in enumerate(map(str, order)):
        rng = np.random.default_rng([seed, ci])
        pos = np.flatnonzero(labels == cat)
        neg = np.flatnonzero(labels != cat)
        n_pos = len(pos) if max_per_task is None else min(len(pos), max_per_task // 2)
        pos = np.sort(rng.choice(pos, n_pos, replace=False))
        neg = np.sort(rng.choice(neg, n_pos, replace=False))
        rows = np.concatenate([pos, neg])
        y = np.concatenate([np.ones(n_pos, np.int64), np.zeros(n_pos, np.int64)])
        train, test = balanced_split(y, seed=seed)
        tasks.append(ProbeTask(f"fortune_{cat}", y, train, test,
                               texts=[docs[i].text.strip() for i in rows],
                               info={"source": "fortune", "category": cat,
                                     "classes": ["rest", cat]}))
    if not tasks:
        raise GLPError(f"no fortune category has >= {min_count} entries")
    return tasks


# -- user files -------------------------------------------------------------------------------

def load_task_file(path, *, seed: int = SPLIT_SEED) -> ProbeTask:
    """A CSV (columns text + label or target) or JSONL ({"text", "label"}) file: one task,
    named after the file."""
    path = Path(path)
    texts, labels = [], []
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            lab = "label" if "label" in cols else "target" if "target" in cols else None
            if "text" not in cols or lab is None:
                raise GLPError(f"{path}: need columns text and label (or target), got {cols}")
            for row in reader:
                texts.append(row["text"] or "")
                labels.append(row[lab])
    elif path.suffix == ".jsonl":
        from glp_jax.data.corpus import jsonl_documents

        docs = jsonl_documents(path)
        if any(d.label == "" for d in docs):
            raise GLPError(f"{path}: every line needs a label: {{\"text\": ..., \"label\": ...}}")
        texts, labels = [d.text for d in docs], [d.label for d in docs]
    else:
        raise GLPError(f"{path}: probing tasks are .csv or .jsonl files (or original-layout "
                       f"folders with X_train.pt)")
    return task_from_texts(path.stem, texts, labels, seed=seed, info={"source": str(path)})


def _load_tensor(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    import torch

    t = torch.load(path, map_location="cpu", weights_only=True)
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".pt", ".npy"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def is_original_task(path) -> bool:
    return Path(path).is_dir() and _find(Path(path), "X_train") is not None


def load_original_task(folder, *, seed: int = SPLIT_SEED) -> ProbeTask:
    """A task in the original release's layout (module docstring): cached activations with
    their given train/test split."""
    folder = Path(folder)
    xtr_p, xte_p = _find(folder, "X_train"), _find(folder, "X_test")
    if xtr_p is None or xte_p is None:
        raise GLPError(f"{folder}: expected X_train.pt and X_test.pt")
    xtr, xte = (_load_tensor(p) for p in (xtr_p, xte_p))
    xtr, xte = (x[:, 0, :] if x.ndim == 3 else x for x in (xtr, xte))
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise GLPError(f"{folder}: X_train {xtr.shape} / X_test {xte.shape} must be (N, 1, d)")
    ytr_p, yte_p = _find(folder, "y_train"), _find(folder, "y_test")
    if ytr_p is not None and yte_p is not None:
        y, classes = encode_labels(np.concatenate([_load_tensor(ytr_p).reshape(-1),
                                                   _load_tensor(yte_p).reshape(-1)]))
        labels_from = "y_train/y_test"
    else:
        csvs = [p for p in (folder / f"{folder.name}.csv", folder.parent / f"{folder.name}.csv")
                if p.is_file()]
        if not csvs:
            raise GLPError(f"{folder}: no y_train.pt/y_test.pt and no {folder.name}.csv with "
                           f"a target column")
        with open(csvs[0], newline="", encoding="utf-8") as f:
            target = [row["target"] for row in csv.DictReader(f)]
        y_all, classes = encode_labels(target)
        train, test = balanced_split(y_all, seed=seed)
        if (len(train), len(test)) != (len(xtr), len(xte)):
            raise GLPError(f"{folder}: the CSV's split has {len(train)}/{len(test)} rows but "
                           f"X_train/X_test hold {len(xtr)}/{len(xte)}")
        y = np.concatenate([y_all[train], y_all[test]])
        labels_from = f"{csvs[0].name} target + balanced_split(seed={seed})"
    if len(y) != len(xtr) + len(xte):
        raise GLPError(f"{folder}: {len(y)} labels for {len(xtr)} + {len(xte)} rows")
    n_tr = len(xtr)
    return ProbeTask(folder.name, y, np.arange(n_tr), np.arange(n_tr, len(y)),
                     acts=np.concatenate([xtr, xte]).astype(np.float32),
                     info={"source": str(folder), "classes": classes, "labels_from": labels_from})


def load_tasks(specs) -> list[ProbeTask]:
    """Tasks from a list of: ProbeTask objects, .csv/.jsonl files, original-layout task
    folders, or folders holding several of those (one level down)."""
    out: list[ProbeTask] = []
    for s in specs:
        if isinstance(s, ProbeTask):
            out.append(s)
            continue
        p = Path(s)
        if p.is_file():
            out.append(load_task_file(p))
        elif is_original_task(p):
            out.append(load_original_task(p))
        elif p.is_dir():
            folders = {c.name for c in p.iterdir() if is_original_task(c)}
            # a TASK.csv beside an original-layout TASK/ folder is its label file, not a task
            found = sorted(c for c in p.iterdir() if is_original_task(c) or (
                c.is_file() and c.suffix in (".csv", ".jsonl") and c.stem not in folders))
            if not found:
                raise GLPError(f"{p} holds no .csv/.jsonl task and no task folder with X_train.pt")
            out += load_tasks(found)
        else:
            raise GLPError(f"probing task {s} not found")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise GLPError(f"task names must be unique, got {names}")
    return out
