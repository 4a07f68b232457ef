"""LLM layer numbers vs layer positions: the one place that converts between them.

A model trained on LLM layers [l_0, ..., l_{n-1}] keeps per-layer statistics [n, d] whose
row p belongs to layer l_p (its *position*). With a single layer the statistics are [d]
and there is no position: None, which is what `Normalizer` expects then.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def layer_position(layers: Sequence[int], layer: int) -> int | None:
    """Position of LLM layer `layer` among `layers`; None when there is only one layer."""
    layers = [int(k) for k in layers]
    if layer not in layers:
        raise ValueError(f"layer {layer} not among the trained layers {layers}")
    return layers.index(layer) if len(layers) > 1 else None


def split_examples(examples: np.ndarray, rows: int, n_layers: int
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(row, layer position) of example ids over `rows` rows x `n_layers` layers.

    Example e is row e % rows of position e // rows, so shuffling example ids shuffles the
    (row, layer) product space; positions are None when there is only one layer."""
    examples = np.asarray(examples, np.int64)
    return examples % rows, (examples // rows if n_layers > 1 else None)
