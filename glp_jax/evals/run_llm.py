"""A training run's LLM side: its training store, the LLM that made it, and the layer.

Every evaluation that runs the live LLM (delta LM loss, probing, steering, meta-neuron
inspection) starts from a GLP run folder; this is the one place that reads which store,
model and layer the run was trained on, and loads (or checks) the LLM accordingly.
"""

from __future__ import annotations

from glp_jax.errors import GLPError


def store_of_run(run_dir):
    """(run.json, the run's training ActivationStore)."""
    from glp_jax.data.store import ActivationStore
    from glp_jax.rundir import RunDir

    run = RunDir(run_dir)
    resolved, url = run.resolved(), run.store_url("train_dataset")
    if not url:
        raise GLPError(f"{run_dir}/run.json names no train_dataset: cannot tell which LLM, "
                       f"layer and corpus it was trained on")
    try:
        return resolved, ActivationStore.open(url)
    except GLPError as e:
        raise GLPError(f"cannot open the run's training store {url} ({e}); its metadata names "
                       f"the LLM, the layer, the corpus and the held-out split. Make it "
                       f"reachable (a relative path is looked up from the working directory and every folder above the run), or "
                       f"pass the LLM and sequences/tasks explicitly") from e


def lm_name_of(model_id: str) -> str:
    """What load_causal_lm takes for a store's recorded model id."""
    from glp_jax.llm.loading import EMBEDDED_MODEL

    return EMBEDDED_MODEL if model_id.startswith(f"{EMBEDDED_MODEL}:") else model_id


def run_layer(run_dir, layer: int | None = None):
    """(layer, store, run.json): the run's only layer, or `layer` checked against them."""
    resolved, store = store_of_run(run_dir)
    run_layers = [int(k) for k in resolved.get("layers") or store.meta.layers]
    if layer is None:
        if len(run_layers) != 1:
            raise GLPError(f"the run was trained on layers {run_layers}: choose one with layer=")
        layer = run_layers[0]
    elif layer not in run_layers:
        raise GLPError(f"layer {layer} is not among the run's layers {run_layers}")
    return layer, store, resolved


def run_llm_and_layer(run_dir, layer: int | None = None) -> tuple[str, int]:
    """(LLM name for load_causal_lm, layer) from the run's training store."""
    layer, store, _ = run_layer(run_dir, layer)
    return lm_name_of(store.meta.model), layer


def run_lm(run_dir, layer: int | None = None, lm=None, device: str = "cpu"):
    """(LoadedLM, layer, store): the run's LLM in fp32 (or `lm`, checked to be that LLM)."""
    layer, store, _ = run_layer(run_dir, layer)
    if lm is None:
        from glp_jax.llm.loading import load_causal_lm

        lm = load_causal_lm(lm_name_of(store.meta.model), dtype="float32", device=device)
    elif lm.model_id != store.meta.model:
        raise GLPError(f"the run was trained on {store.meta.model} activations but lm is "
                       f"{lm.model_id}")
    return lm, layer, store
