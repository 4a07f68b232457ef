"""Import datasets in the original GLP release's format (e.g. `llama1b-layer07-fineweb-1M`).

That format, per layer directory:
    dtype.txt            "int16" (bf16 bit patterns) or "float32"
    data_XXXX.npy        HEADERLESS flat memmaps (despite the suffix), rows packed back to back
    data_indices.npy     a real .npy, uint64 [N, 3]: (file index, start, end) in elements
    rep_statistics.pt    torch pickle {"mean": [d], "var": [d]} float32 (first shard only)
    doc_buffer.json      optional: per-row document index
The import recomputes float64 statistics over all rows (the `.pt` file holds the original's
first-shard fp32 estimate), so rep_statistics.pt is not read here; the checkpoint loader
reads such files only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from glp_jax.data.store import ActivationStore, StoreMeta
from glp_jax.errors import StoreError

ROWS_PER_APPEND = 65536


def find_layer_dir(src: Path) -> tuple[Path, int]:
    """`src` itself if it holds data_indices.npy, else its single layer_XX child."""
    if (src / "data_indices.npy").exists():
        m = re.search(r"layer_(\d+)", src.name)
        return src, int(m.group(1)) if m else -1
    layer_dirs = sorted(p for p in src.glob("layer_*") if (p / "data_indices.npy").exists())
    if len(layer_dirs) == 1:
        return layer_dirs[0], int(layer_dirs[0].name.split("_")[1])
    if not src.exists():
        raise StoreError(f"{src} does not exist")
    raise StoreError(f"{src} is not an original-format dataset: expected data_indices.npy in it "
                     f"or in exactly one layer_XX/ subdirectory (found {len(layer_dirs)})")


class OriginalReader:
    """Rows of one original-format layer directory as float32 (bf16 decoded exactly)."""

    def __init__(self, layer_dir: Path):
        self.dir = layer_dir
        dtype_txt = (layer_dir / "dtype.txt")
        if not dtype_txt.exists():
            raise StoreError(f"{layer_dir} has no dtype.txt; not an original-format dataset")
        self.dtype = np.dtype(dtype_txt.read_text().strip().replace("np.", ""))
        if self.dtype not in (np.int16, np.float32):
            raise StoreError(f"{dtype_txt}: unsupported dtype {self.dtype} (int16 or float32)")
        self.indices = np.load(layer_dir / "data_indices.npy", allow_pickle=False).astype(np.int64)
        if self.indices.ndim != 2 or self.indices.shape[1] != 3 or len(self.indices) == 0:
            raise StoreError(f"{layer_dir}/data_indices.npy must be a non-empty [N, 3] array")
        widths = self.indices[:, 2] - self.indices[:, 1]
        if (widths != widths[0]).any() or widths[0] <= 0:
            raise StoreError(f"{layer_dir}/data_indices.npy: rows have differing widths")
        self.d = int(widths[0])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def _map(self, f: int) -> np.memmap:
        if f not in self._maps:
            path = self.dir / f"data_{f:04d}.npy"
            if not path.exists():
                raise StoreError(f"{path} is missing (referenced by data_indices.npy)")
            self._maps[f] = np.memmap(path, mode="r", dtype=self.dtype)
        return self._maps[f]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in the stored dtype decoded to bf16 or float32 values."""
        idx = self.indices[start:stop]
        out = np.empty((len(idx), self.d), self.dtype)
        for f in np.unique(idx[:, 0]):
            sel = np.flatnonzero(idx[:, 0] == f)
            mm = self._map(int(f))
            starts = idx[sel, 1]
            if starts[-1] + self.d > mm.shape[0]:
                raise StoreError(f"data_{f:04d}.npy is shorter than data_indices.npy says (truncated?)")
            if (np.diff(starts) == self.d).all():  # contiguous run: one slice
                out[sel] = mm[starts[0]: starts[-1] + self.d].reshape(-1, self.d)
            else:
                out[sel] = mm[starts[:, None] + np.arange(self.d)]
        return out.view(ml_dtypes.bfloat16) if self.dtype == np.int16 else out


def import_original(src: str, dst: str, model: str = "unknown (imported)", layer: int = -1,
                    progress: bool = True) -> ActivationStore:
    from glp_jax.progress import progress_bar

    layer_dir, found_layer = find_layer_dir(Path(src))
    reader = OriginalReader(layer_dir)
    layer = layer if layer >= 0 else max(found_layer, 0)
    doc_ids = np.full(len(reader), -1, np.int32)
    docs_json = layer_dir / "doc_buffer.json"
    if docs_json.exists():
        doc_ids = np.asarray(json.loads(docs_json.read_text()), np.int32)[: len(reader)]
    meta = StoreMeta(model=model, layers=[layer], d=reader.d,
                     dtype="bfloat16" if reader.dtype == np.int16 else "float32",
                     corpus=f"imported:{Path(src).name}", extra={"imported_from": str(src)})
    with ActivationStore.open_for_writing(dst, meta, "glp store import-original") as store:
        bar = progress_bar(len(reader), "import", "row", enabled=progress, initial=len(store))
        while len(store) < len(reader):  # resumable: continues from the committed row count
            a, b = len(store), min(len(store) + ROWS_PER_APPEND, len(reader))
            store.append({layer: reader.rows(a, b)}, np.full(b - a, -1, np.int32), doc_ids[a:b],
                         cursor={"rows_imported": b})
            bar.update(b - a)
        bar.close()
    return store
