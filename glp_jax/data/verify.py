"""`glp store verify`: read every committed chunk of a store and say exactly what is damaged.

Per array (each layer, token_ids, doc_ids), shard by shard over the committed rows:
  - a shard file that is missing (zarr would silently read zeros for it);
  - a shard that cannot be read (truncated file, index or chunk checksum mismatch), narrowed
    to the damaged chunks by re-reading that shard chunk by chunk;
  - rows holding NaN/Inf;
then the float64 moments of every intact layer are recomputed and compared with those the
commit record holds: on stores without chunk checksums this still catches altered bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import tensorstore as ts

from glp_jax.data.stats import Moments
from glp_jax.data.store import ActivationStore
from glp_jax.kv import child_spec, context_for, kvstore_spec
from glp_jax.progress import progress_bar

# What ActivationStore.checksums() means, for people (`glp store info`, `glp store verify`).
CHECKSUM_TEXT = {"chunks+index": "crc32c on every chunk and shard index",
                 "index": "crc32c on shard indexes only (an older store: altered chunk bytes "
                          "are caught by the statistics `glp store verify` compares)",
                 "none": "none"}
STATS_RTOL = 1e-6  # float64 moments of the same rows summed in another order agree far better


@dataclass
class Damage:
    array: str  # "layer 14", "token_ids", "doc_ids"
    start: int
    stop: int
    what: str

    def line(self) -> str:
        return f"{self.array} rows [{self.start}, {self.stop}): {self.what}"


@dataclass
class VerifyReport:
    url: str
    rows: int
    checksums: str
    shards_read: int = 0
    damage: list[Damage] = field(default_factory=list)
    stats: dict[str, str] = field(default_factory=dict)  # layer -> "ok" or what differs

    @property
    def ok(self) -> bool:
        return not self.damage and all(v == "ok" for v in self.stats.values())

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _present_shards(url: str, folder: str) -> set[int]:
    """Shard numbers with a file under <folder>/c/ (first grid index)."""
    kv = ts.KvStore.open(child_spec(child_spec(kvstore_spec(url), folder), "c"),
                         context=context_for(url)).result()
    return {int(k.decode().split("/")[0]) for k in kv.list().result()}


def _merge(ranges: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for lo, hi, why in sorted(ranges):
        if out and out[-1][1] == lo and out[-1][2] == why:
            out[-1] = (out[-1][0], hi, why)
        else:
            out.append((lo, hi, why))
    return out


def _read_shard(store: ActivationStore, label: str, arr, chunk: int, lo: int, hi: int):
    """(rows or None, damaged ranges) of rows [lo, hi) of one shard."""
    try:
        return np.asarray(arr[lo:hi].read().result()), []
    except ValueError:
        pass
    bad = []
    for c0 in range(lo, hi, chunk):  # narrow it down: which chunks fail
        c1 = min(c0 + chunk, hi)
        try:
            arr[c0:c1].read().result()
        except ValueError as e:
            bad.append((c0, c1, store.damaged_rows(label, str(e), np.arange(c0, c1))[2]))
    return None, _merge(bad)


def _compare(mine: Moments, committed: Moments) -> str:
    if mine.count != committed.count:
        return f"count {mine.count} read, {committed.count} committed"
    scale = np.sqrt(np.maximum(committed.var, 0)) + np.abs(committed.mean) + 1e-30
    d_mean = float(np.max(np.abs(mine.mean - committed.mean) / scale))
    d_m2 = float(np.max(np.abs(mine.m2 - committed.m2) / (np.abs(committed.m2) + 1e-30)))
    if max(d_mean, d_m2) > STATS_RTOL:
        return (f"statistics differ from the commit record (mean by {d_mean:.2e} of its scale, "
                f"variance by {d_m2:.2e} relative): rows were altered after they were committed")
    return "ok"


def verify_store(url: str, progress: bool = True) -> VerifyReport:
    from glp_jax.data.multistore import is_multi_root, verify_workers

    if is_multi_root(url):
        return verify_workers(url, progress)
    store = ActivationStore.open(url)
    n, sr = len(store), store.meta.shard_rows
    report = VerifyReport(store.url, n, store.checksums())
    n_shards = -(-n // sr)
    arrays = store.arrays()
    bar = progress_bar(n_shards * len(arrays), "verify", "shard", enabled=progress)
    for label, folder, arr, chunk in arrays:
        present = _present_shards(url, folder) if n else set()
        moments = Moments.zeros((store.d,)) if label.startswith("layer") else None
        layer_damaged = False
        for i in range(n_shards):
            lo, hi = i * sr, min((i + 1) * sr, n)
            bar.update(1)
            if i not in present:
                report.damage.append(Damage(label, lo, hi, "shard file is missing"))
                layer_damaged = True
                continue
            rows, bad = _read_shard(store, label, arr, chunk, lo, hi)
            report.shards_read += 1
            report.damage += [Damage(label, a, b, why) for a, b, why in bad]
            if rows is None:
                layer_damaged = True
                continue
            if moments is not None:
                finite = np.isfinite(rows.astype(np.float32)).all(axis=1)
                if not finite.all():
                    report.damage += [Damage(label, lo + a, lo + b, "rows hold NaN/Inf") for a, b, _
                                      in _merge([(int(j), int(j) + 1, "") for j in np.flatnonzero(~finite)])]
                    layer_damaged = True
                moments = moments.merge(Moments.of(rows))
        if moments is not None:
            k = int(label.split()[1])
            report.stats[label] = ("not compared (damaged rows)" if layer_damaged
                                   else _compare(moments, store.moments(k)))
    bar.close()
    return report


def report_lines(report: VerifyReport) -> list[str]:
    """What `glp store verify` prints: one line per damaged range, then a verdict."""
    checks = CHECKSUM_TEXT[report.checksums]
    lines = [f"store {report.url}: {report.rows:,} committed rows, {report.shards_read} shard "
             f"reads; checksums: {checks}"]
    lines += [d.line() for d in report.damage]
    lines += [f"{k}: {v}" for k, v in report.stats.items() if v != "ok"]
    if report.ok:
        lines.append("ok: every chunk read back intact and the statistics match the commit record")
    else:
        arrays = sorted({d.array for d in report.damage} | {k for k, v in report.stats.items()
                                                            if v != "ok"})
        lines.append(f"DAMAGED: {len(report.damage)} damaged range(s) in {', '.join(arrays)}; "
                     f"re-extract into a new store, or restore this one from a copy")
    return lines
