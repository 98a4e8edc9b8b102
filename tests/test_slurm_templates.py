"""launch/slurm/*.sbatch rendered for every recipe with sbatch/srun/scontrol/torchrun stubbed on PATH:
on a fresh checkout (no runs/slurm/) the log directory exists before sbatch opens it, the node count
comes from the recipe's world size, srun passes --cpus-per-task, and torchrun's nodes x processes per
node equal the recipe's world size. A job whose allocation does not match stops before srun."""
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "launch" / "slurm").glob("*.sbatch"))
RECIPES = sorted((ROOT / "launch" / "recipes").glob("*.yaml"))

# sbatch: the log's directory must exist when sbatch runs (it opens --output first); then "run" the
# job on the requested nodes with SLURM_* set, as Slurm would.
SBATCH = r"""#!/bin/bash
echo "$@" >> "$CAPTURE/sbatch"
nodes=1
while (($#)); do
  case $1 in
    --nodes=*) nodes=${1#--nodes=} ;;
    --output=*) d=$(dirname "${1#--output=}"); [[ -d $d ]] || { echo "no log dir $d" >&2; exit 9; } ;;
    --export=*) IFS=, read -ra kv <<< "${1#--export=}"; for x in "${kv[@]}"; do [[ $x == ALL ]] || export "$x"; done ;;
    -*) ;;
    *) script=$1; shift; break ;;
  esac
  shift
done
SLURM_JOB_ID=4242 SLURM_NNODES=$nodes SLURM_JOB_NODELIST=node[1-$nodes] SLURM_CPUS_PER_TASK=96 bash "$script" "$@"
"""
SRUN = r"""#!/bin/bash
echo "$@" >> "$CAPTURE/srun"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
TORCHRUN = r"""#!/bin/bash
echo "$@" >> "$CAPTURE/torchrun"
"""
SCONTROL = "#!/bin/bash\necho node1\n"


def recipe_world_size(recipe: Path) -> int:
    text = recipe.read_text()
    field = re.search(r"^\s+world_size:\s*(\d+)", text, re.MULTILINE)
    comment = re.search(r"^#\s*world_size:\s*(\d+)", text, re.MULTILINE)
    return int((field or comment).group(1))


@pytest.fixture
def checkout(tmp_path):
    """A fresh checkout's launch/ (no runs/) with the Slurm tools stubbed."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "launch", repo / "launch", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("")
    bin_dir, capture = tmp_path / "bin", tmp_path / "capture"
    bin_dir.mkdir()
    capture.mkdir()
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("torchrun", TORCHRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("NODES", "RECIPE")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", CAPTURE=str(capture))
    return repo, capture, env


def _run(repo, env, *cmd, **extra_env):
    return subprocess.run(cmd, cwd=repo, env={**env, **extra_env}, capture_output=True, text=True, timeout=60)


def _torchrun_args(capture: Path) -> dict:
    line = (capture / "torchrun").read_text().strip().splitlines()[-1]
    args = dict(re.findall(r"--([\w-]+)=(\S+)", line))
    args["tail"] = shlex.split(line.split("launch/train.py", 1)[1])
    return args


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_bash_submission_derives_nodes_from_the_world_size(checkout, template, recipe):
    repo, capture, env = checkout
    rel = f"launch/recipes/{recipe.name}"
    proc = _run(repo, env, "bash", f"launch/slurm/{template.name}", "train.train_steps=3", RECIPE=rel)
    assert proc.returncode == 0, proc.stderr
    assert (repo / "runs" / "slurm").is_dir()
    assert "--output=runs/slurm/" in (capture / "sbatch").read_text()
    assert "--cpus-per-task=96" in (capture / "srun").read_text()
    args = _torchrun_args(capture)
    world = recipe_world_size(recipe)
    assert int(args["nnodes"]) * int(args["nproc-per-node"]) == world
    assert args["tail"][:2] == ["--config", rel] and "train.train_steps=3" in args["tail"]


def test_plain_sbatch_with_too_few_nodes_stops_before_srun(checkout):
    repo, capture, env = checkout
    proc = _run(repo, env, "sbatch", "--nodes=1", "launch/slurm/gspo.sbatch",
                RECIPE="launch/recipes/gspo_qwen3_30b_a3b_ep.yaml")
    assert proc.returncode == 2
    assert "needs 16 GPUs" in proc.stderr and "--nodes=2" in proc.stderr
    assert not (capture / "srun").exists()


def test_plain_sbatch_with_matching_nodes_launches(checkout):
    repo, capture, env = checkout
    proc = _run(repo, env, "sbatch", "--nodes=4", "launch/slurm/sft.sbatch",
                RECIPE="launch/recipes/sft_seed_oss_36b.yaml")
    assert proc.returncode == 0, proc.stderr
    args = _torchrun_args(capture)
    assert (int(args["nnodes"]), int(args["nproc-per-node"])) == (4, 8)


def test_nodes_variable_overrides_the_derived_count(checkout):
    repo, capture, env = checkout
    proc = _run(repo, env, "bash", "launch/slurm/sft.sbatch", RECIPE="launch/recipes/sft_seed_oss_36b.yaml", NODES="4")
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=4" in (capture / "sbatch").read_text()


def test_parallel_world_size_override_wins(checkout):
    repo, capture, env = checkout
    proc = _run(repo, env, "bash", "launch/slurm/gspo.sbatch", "parallel.world_size=16",
                RECIPE="launch/recipes/gspo_qwen2.5_3b_math.yaml")
    assert proc.returncode == 0, proc.stderr
    args = _torchrun_args(capture)
    assert int(args["nnodes"]) * int(args["nproc-per-node"]) == 16
