"""The files of one run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from glp_jax.errors import GLPError


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl merged by step (a later line for the same step adds or wins).

    A resumed run may log a step twice; the later value wins. A killed writer may leave a
    partial last line, which is skipped; a bad line elsewhere is an error.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    by_step: dict[float, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                break
            raise GLPError(f"{path}:{i + 1} is not valid JSON ({e}); repair or delete "
                           "that line") from e
        step = obj.get("step") if isinstance(obj, dict) else None
        if step is None or isinstance(step, bool):  # rows without a numeric step are skipped
            continue
        try:
            if not math.isfinite(float(step)):
                continue
        except (TypeError, ValueError):
            continue
        by_step.setdefault(float(step), {}).update(obj)
    return [by_step[s] for s in sorted(by_step)]
