"""Every YAML in experiments/ validates; the paper's configurations have the published
parameter counts and AOT-compile one training step at reduced size."""

from pathlib import Path

import pytest

from glp_jax.cli import main
from glp_jax.config import TrainConfig, load_config
from glp_jax.errors import ConfigError
from glp_jax.model import GLPConfig, param_count

ROOT = Path(__file__).resolve().parents[1] / "experiments"
PAPER = {  # GLP_SPEC.md section 2
    "glp-llama1b-d3": 453_117_952, "glp-llama1b-d6": 855_881_728,
    "glp-llama1b-d12": 1_661_409_280, "glp-llama1b-d24": 3_272_464_384,
    "glp-llama1b-d12-multi": 1_694_971_904, "glp-llama8b-d6": 3_423_039_488,
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_params_and_recipe(name):
    cfg = load_config([f"config={ROOT / 'paper' / (name + '.yaml')}"])
    glp = GLPConfig(d_input=cfg.d_input, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
                    n_layers=cfg.n_layers, multi_layer_n_layers=cfg.multi_layer_n_layers)
    assert param_count(glp.resolved()) == PAPER[name]
    assert cfg.total_steps == 250_000 and cfg.batch_size == 4096
    assert cfg.learning_rate == 5e-5 and cfg.gradient_clipping_threshold == 1.0
    assert cfg.epoch_checkpoints()[-1] == 1024
    assert cfg.train_dataset.startswith("data/") or "://" in cfg.train_dataset


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_compiles_reduced(name, capsys):
    path = ROOT / "paper" / (name + ".yaml")
    assert main(["config", "check", f"config={path}", "--compile", "--shrink", "64"]) == 0
    out = capsys.readouterr().out
    assert f"params: {PAPER[name]}" in out and "compiled one step" in out


def test_all_experiment_yaml_files_validate():
    from glp_jax.reproduce.plan import ReproducePlan

    files = sorted(ROOT.rglob("*.yaml"))
    assert len(files) >= 7
    plans = {ROOT / "reproduce" / "cpu.yaml", ROOT / "reproduce" / "paper-llama1b.yaml"}
    assert plans <= set(files)
    for f in files:  # reproduction plans are plans; every other YAML is a training config
        load_config([f"config={f}"], cls=ReproducePlan if f in plans else TrainConfig)


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("GLP_DATA_ROOT", "gs://bucket/acts")
    cfg = load_config([f"config={ROOT / 'paper' / 'glp-llama1b-d3.yaml'}"])
    assert cfg.train_dataset == "gs://bucket/acts/llama1b-l07-fineweb/train"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_compiles_full_size(name, capsys):
    """AOT compile at full width and batch 4096 on abstract inputs (nothing allocated)."""
    path = ROOT / "paper" / (name + ".yaml")
    assert main(["config", "check", f"config={path}", "--compile", "--full"]) == 0
    out = capsys.readouterr().out
    assert "batch 4096" in out and "temp memory" in out


def test_yaml_syntax_error_is_one_line_naming_file_and_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 64\nlearning_rate: [1e-3\nn_layers: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config([f"config={bad}"])
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "line " in msg and "fix the syntax" in msg
