"""Launchers in dry-run mode print the exact commands they would run."""

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(script, **env):
    full = {**os.environ, "DRY_RUN": "1", "GLP": "glp", **env}
    out = subprocess.run(["bash", str(ROOT / "launch" / script)], env=full, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.strip().splitlines()]


def test_local_passes_config_output_and_overrides():
    [cmd] = _dry("local.sh", CONFIG="experiments/cpu/smollm2-l14-d3.yaml", RUN_NAME="try",
                 RUN_ROOT="/tmp/r", OVERRIDES="num_steps=5 batch_size=8")
    assert cmd == ["glp", "train", "config=experiments/cpu/smollm2-l14-d3.yaml",
                   "output_path=/tmp/r/try", "num_steps=5", "batch_size=8"]


def test_gpu_node_fills_the_data_axis():
    [cmd] = _dry("gpu_node.sh", CONFIG="experiments/paper/glp-llama1b-d3.yaml", MESH_FSDP="2")
    assert cmd[0] == "env" and cmd[2:4] == ["glp", "train"]
    assert "mesh_data=-1" in cmd and "mesh_fsdp=2" in cmd
    assert "output_path=runs/glp-llama1b-d3" in cmd


def test_slurm_submits_one_task_per_node():
    [cmd] = _dry("slurm.sh", CONFIG="experiments/paper/glp-llama8b-d6.yaml", NODES="4",
                 GPUS_PER_NODE="8", RUN_ROOT="gs://bucket/runs", RUN_NAME="sweep/x")
    assert cmd[0] == "sbatch"
    assert "--nodes=4" in cmd and "--ntasks-per-node=1" in cmd and "--gpus-per-node=8" in cmd
    assert "--job-name=glp-sweep-x" in cmd
    wrap = next(a for a in cmd if a.startswith("--wrap="))[len("--wrap="):]
    inner = shlex.split(wrap)
    assert inner[:3] == ["srun", "glp", "train"]
    assert "config=experiments/paper/glp-llama8b-d6.yaml" in inner
    assert "output_path=gs://bucket/runs/sweep/x" in inner


def test_slurm_job_is_requeued_when_training_exits_75():
    [cmd] = _dry("slurm.sh", CONFIG="experiments/paper/glp-llama8b-d6.yaml", SIGNAL_LEAD_S="300",
                 MAX_REQUEUES="3")
    # Requeueable, SIGTERM to every task 300 s before the time limit, one log across requeues.
    assert {"--requeue", "--signal=TERM@300", "--open-mode=append"} <= set(cmd)
    wrap = next(a for a in cmd if a.startswith("--wrap="))[len("--wrap="):]
    srun, after = wrap.split(" ; ", 1)
    assert shlex.split(srun)[:3] == ["srun", "glp", "train"]
    assert after == ("s=$?; if [ $s -eq 75 ] && [ ${SLURM_RESTART_COUNT:-0} -lt 3 ]; then "
                     "scontrol requeue $SLURM_JOB_ID; fi; exit $s")


def _retrying(inner, **env):
    script = f'source "{ROOT}/launch/common.sh"; run_retrying sh -c {shlex.quote(inner)}'
    return subprocess.Popen(["bash", "-c", script], env={**os.environ, "RETRY_DELAY_S": "0", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_retry_loop_reruns_on_75_only_and_is_bounded(tmp_path):
    count = tmp_path / "count"
    bump = f"echo x >> {count}; "
    proc = _retrying(bump + '[ $(wc -l < ' + str(count) + ') -ge 3 ] && exit 0; exit 75')
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and count.read_text().count("x") == 3  # two reruns, then done
    assert err.count("launch: preempted (exit 75)") == 2
    count.unlink()
    proc = _retrying(bump + "exit 75", MAX_RETRIES="2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and count.read_text().count("x") == 3  # bounded
    assert "still preempted after 2 reruns" in err
    count.unlink()
    proc = _retrying(bump + "exit 3")
    proc.communicate(timeout=60)
    assert proc.returncode == 3 and count.read_text().count("x") == 1  # other failures: no rerun


def test_retry_loop_stops_when_the_launcher_itself_is_interrupted(tmp_path):
    import signal
    import time

    count = tmp_path / "count"
    proc = _retrying(f"echo x >> {count}; sleep 1; exit 75")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C at the launcher: no rerun after the command ends
    proc.communicate(timeout=60)
    assert proc.returncode == 75 and count.read_text().count("x") == 1


def test_tpu_vm_installs_then_runs_on_all_workers():
    install, train = _dry("tpu_vm.sh", TPU_NAME="pod", ZONE="us-east5-a",
                          CONFIG="experiments/paper/glp-llama1b-d24.yaml",
                          RUN_ROOT="gs://b/runs", DATA_ROOT="gs://b/acts")
    for cmd in (install, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
        assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd
    assert "make install" in install[-1] and "jax[tpu]" in install[-1]
    remote = shlex.split(train[-1].split("=", 1)[1].split("&&", 1)[1])
    assert "GLP_DATA_ROOT=gs://b/acts" in remote
    assert "output_path=gs://b/runs/glp-llama1b-d24" in remote
    assert remote[remote.index("train") - 1].endswith("glp")


def test_extract_writes_val_then_train():
    val, train = _dry("extract.sh", NAME="llama1b-l07", MODEL="meta-llama/Llama-3.2-1B",
                      LAYERS="7", DATA_ROOT="gs://b/acts", TRAIN_TOKENS="1000")
    assert val[:2] == ["glp", "extract"] and train[:2] == ["glp", "extract"]
    assert val[val.index("--split") + 1] == "val" and train[train.index("--split") + 1] == "train"
    assert train[train.index("--out") + 1] == "gs://b/acts/llama1b-l07/train"
    assert train[train.index("--max-tokens") + 1] == "1000"
    assert train[train.index("--layers") + 1] == "7"


def test_sweep_covers_the_grid_with_distinct_run_names():
    cmds = _dry("sweep.sh", BACKEND="local", CONFIG="experiments/paper/glp-llama1b-d3.yaml",
                DEPTHS="3 6", BUDGETS="1000000 4000000", SEEDS="0 1", SWEEP="s1",
                RUN_ROOT="/tmp/sw")
    assert len(cmds) == 8
    outs = {next(a for a in c if a.startswith("output_path=")) for c in cmds}
    assert len(outs) == 8 and "output_path=/tmp/sw/s1/d6-a4000000-s1" in outs
    c = next(c for c in cmds if "output_path=/tmp/sw/s1/d6-a4000000-s1" in c)
    assert {"n_layers=6", "num_activations=4000000", "seed=1", "num_steps=null",
            "sweep_name=s1"} <= set(c)


def test_paper_extraction_scripts_match_their_configs():
    for script, config, layers in (("extract_llama1b.sh", "glp-llama1b-d3.yaml", "7"),
                                   ("extract_llama1b_multi.sh", "glp-llama1b-d12-multi.yaml", "all"),
                                   ("extract_llama8b.sh", "glp-llama8b-d6.yaml", "15")):
        out = subprocess.run(["bash", str(ROOT / "experiments" / "paper" / script)],
                             env={**os.environ, "DRY_RUN": "1", "GLP": "glp"}, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        val, train = [shlex.split(ln) for ln in out.strip().splitlines()]
        assert train[train.index("--layers") + 1] == layers
        assert train[train.index("--corpus") + 1] == "hf:HuggingFaceFW/fineweb:sample-10BT"
        store = train[train.index("--out") + 1]
        text = (ROOT / "experiments" / "paper" / config).read_text()
        assert "${GLP_DATA_ROOT}/" + store.split("/", 1)[1] in text
        assert val[val.index("--out") + 1] == store[: -len("train")] + "val"


def test_reproduce_runs_the_named_plan_and_its_plans_load():
    from glp_jax.reproduce.plan import load_plan

    [cmd] = _dry("reproduce.sh")
    assert cmd == ["glp", "reproduce", "config=experiments/reproduce/cpu.yaml"]
    [cmd] = _dry("reproduce.sh", PLAN="experiments/reproduce/paper-llama1b.yaml",
                 OVERRIDES="root=/tmp/r report_dir=/tmp/rep")
    assert cmd == ["glp", "reproduce", "config=experiments/reproduce/paper-llama1b.yaml",
                   "root=/tmp/r", "report_dir=/tmp/rep"]
    paper = load_plan(["config=experiments/reproduce/paper-llama1b.yaml"])
    assert (paper.layer, paper.depths, paper.activations) == (7, [3, 6, 12, 24], 1_024_000_000)
    assert paper.widths == [] and paper.fd_samples == 50_000 and paper.dlm_seqs == 2048
    cpu = load_plan()
    assert len(cpu.widths) == len(cpu.depths) and cpu.utility_steer_norm == "diffmean"
