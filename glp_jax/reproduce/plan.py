"""What `glp reproduce` runs: one flat, typed plan (YAML + key=value, unknown keys rejected).

The CPU plan (experiments/reproduce/cpu.yaml) is sized to finish within 2 hours on 2 CPU
cores; a paper plan (experiments/reproduce/paper-llama1b.yaml) names the paper's model,
layer, widths, depths and sizes for a GPU/TPU host. Every size the evaluations use is a
key here, so the report can state exactly what was reduced from the paper and by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from glp_jax.config import load_config
from glp_jax.errors import ConfigError

DEFAULT_PLAN = "experiments/reproduce/cpu.yaml"


def _steer_default(name: str):
    """A default that evals/steer.py owns (imported only when a plan is built)."""
    from glp_jax.evals import steer

    value = getattr(steer, name)
    return list(value) if isinstance(value, tuple) else value


@dataclass
class ReproducePlan:
    # where everything goes (a rerun skips every finished part)
    root: str = "runs/reproduce"
    report_dir: str = "reports"
    # extraction
    model: str = "smollm2"
    corpus: str = "fortune"
    layer: int | None = None  # None = the middle layer
    train_rows: int = 400_000
    val_rows: int = 40_000
    max_length: int = 2048
    batch_tokens: int = 8192
    device: str = "cpu"  # the LLM's torch device (extraction and the LLM-side evaluations)
    # the depth sweep: one cosine run per depth, intermediate evaluations = the data axis
    sweep_config: str = "experiments/reproduce/sweep.yaml"
    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6])
    widths: list[int] = field(default_factory=list)  # d_model per depth (cpu.yaml: 128..384);
    # [] = the sweep config's widths for every depth
    mlp_ratio: int = 2  # d_mlp = mlp_ratio * d_model where widths are given
    activations: int = 2_000_000  # per run
    n_boot: int = 1000  # bootstrap resamples of every fit
    # baselines
    sae_config: str = "experiments/cpu/sae.yaml"
    sae_activations: int = 1_024_000
    pca_k: int = 32
    # Table 1 (FD)
    fd_samples: int = 5000
    fd_steps: int = 50
    fd_steps_list: list[int] = field(default_factory=lambda: [1, 5, 20, 50])
    fd_reference: str = "random"  # random | per-doc (the paper: one token per document)
    fd_replicates: int = 5  # disjoint replicate sets of the bias-corrected FD's interval
    # Table 1 again without reference rows > this x the median norm (massive activations);
    # null: only the paper's protocol
    fd_drop_massive: float | None = 10.0
    # Table 2 (delta LM loss)
    dlm_seqs: int = 128
    dlm_length: int = 64
    # Table 4 (1-D and dense probing) and utility vs compute
    probe_tasks: int = 8  # fortune category tasks (largest first), unless probe_task_files
    probe_task_files: list[str] = field(default_factory=list)  # .csv/.jsonl/original folders
    probe_rows: int = 300
    probe_max_length: int = 128
    probe_sigma: float = 0.1  # meta-neurons of Table 4
    utility_sigma: float = 0.5  # meta-neurons of the utility-vs-compute fits (the paper's)
    # steering
    steer_prompts: int = 16
    steer_rs: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.8, 1.2, 1.6, 2.0])
    steer_direction_texts: int = 64
    utility_steer: bool = True  # steer_score at every checkpoint (finding 6)
    utility_steer_prompts: int = 8
    utility_steer_norm: str = "diffmean"  # mean (the spec) | centred | diffmean (evals/steer.py);
    # diffmean with steer_calibrate = the calibrated scale that decides finding 5
    # The calibrated range (evals/steer.py calibrate_steering): DiffMean alone at r x
    # ||DiffMean|| for r in steer_calibration_rs; r_sat = the smallest r reaching the unsteered
    # concept01 + steer_saturation x the best gain (among r where DiffMean's fluency01 >=
    # steer_fluency_floor x the unsteered model's); the diffmean steering grid is then
    # steer_rs x r_sat / 2.0 (and the utility steer_score's r in [1.2, 2.0] likewise).
    # false: the diffmean variant runs r = steer_rs x ||DiffMean||, and the spec's mean-norm
    # scale decides finding 5.
    steer_calibrate: bool = True
    steer_calibration_rs: list[float] = field(default_factory=lambda: _steer_default(
        "CALIBRATION_RS"))
    steer_saturation: float = field(default_factory=lambda: _steer_default("SATURATION"))
    # only r where DiffMean's fluency01 >= this x the unsteered model's count in the search
    steer_fluency_floor: float = field(default_factory=lambda: _steer_default("FLUENCY_FLOOR"))
    # prompts of the search (the steering prompts are their first steer_prompts; DiffMean
    # alone is cheap, and VADER's concept is noisy); null = 2 x steer_prompts
    steer_calibration_prompts: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.depths or min(self.depths) < 1:
            raise ConfigError(f"depths must be positive integers, got {self.depths}")
        if len(self.depths) < 2:
            raise ConfigError("a reproduction needs at least two depths (findings 1 and 2 "
                              "compare them)")
        for name in ("train_rows", "val_rows", "activations", "sae_activations",
                     "fd_samples", "dlm_seqs", "probe_tasks", "probe_rows", "steer_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.widths and len(self.widths) != len(self.depths):
            raise ConfigError(f"widths {self.widths} must give one d_model per depth "
                              f"{self.depths} (or be [] for the sweep config's widths)")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"depths {self.depths} repeat")
        if self.fd_replicates < 2:
            raise ConfigError(f"fd_replicates must be >= 2 (the FD interval is a t-interval "
                              f"over replicates), got {self.fd_replicates}")
        if self.fd_reference not in ("random", "per-doc"):
            raise ConfigError(f"fd_reference must be random or per-doc, got "
                              f"{self.fd_reference!r}")
        if self.utility_steer_norm not in ("mean", "centred", "diffmean"):
            raise ConfigError(f"utility_steer_norm must be mean, centred or diffmean, got "
                              f"{self.utility_steer_norm!r}")
        if not 0 < self.steer_saturation <= 1:
            raise ConfigError(f"steer_saturation must be in (0, 1], got {self.steer_saturation}")
        if self.steer_calibration_prompts is not None and self.steer_calibration_prompts < 1:
            raise ConfigError(f"steer_calibration_prompts must be >= 1 (or null), got "
                              f"{self.steer_calibration_prompts}")
        if not 0 <= self.steer_fluency_floor <= 1:
            raise ConfigError(f"steer_fluency_floor must be in [0, 1], got "
                              f"{self.steer_fluency_floor}")
        if len(self.steer_calibration_rs) < 2 or min(self.steer_calibration_rs) <= 0:
            raise ConfigError(f"steer_calibration_rs must hold >= 2 positive coefficients, got "
                              f"{self.steer_calibration_rs}")
        if not self.steer_rs or min(self.steer_rs) <= 0:
            raise ConfigError(f"steer_rs must hold positive coefficients (r = 0 is always run "
                              f"too), got {self.steer_rs}")
        if self.fd_steps not in self.fd_steps_list:
            self.fd_steps_list = sorted({*self.fd_steps_list, self.fd_steps})

    def to_dict(self) -> dict:
        return asdict(self)


def load_plan(items: list[str] | None = None) -> ReproducePlan:
    """`config=FILE.yaml` (default: the CPU plan) plus key=value overrides."""
    items = list(items or [])
    if not any(i.startswith("config=") for i in items):
        items.insert(0, f"config={DEFAULT_PLAN}")
    return load_config(items, cls=ReproducePlan)
