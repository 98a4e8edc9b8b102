"""launch/train.py: --help documents the options, bad configs exit with status 2 naming the field
before any process group starts, and every shipped recipe loads and validates at its intended size."""
import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "launch", "train.py")
DEMO_RECIPE = os.path.join(REPO, "launch", "recipes", "sft_demo_cpu.yaml")


def _run(*args, world_size=None):
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    if world_size is not None:
        env.update(RANK="0", WORLD_SIZE=str(world_size))
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_help_lists_every_config_section():
    proc = _run("--help")
    assert proc.returncode == 0
    for section in ("model.", "parallel.", "data.", "optim.", "train.", "generation.", "algorithm."):
        assert section in proc.stdout
    for option in ("--config", "--print-config", "train.resume", "train.lora.enabled", "train.loss"):
        assert option in proc.stdout


@pytest.mark.parametrize("overrides, world_size, field", [
    (["parallel.tp=3"], 2, "parallel.tp"),                     # does not divide the world
    (["train.bogus=1"], 2, "train.bogus"),                     # unknown key
    (["optim.lr=-1"], 2, "optim.lr"),                          # out of range
    (["train.global_batch_size=33"], 2, "train.global_batch_size"),  # not a multiple of mbs*dp
    (["data.seq_length=abc"], 2, "data.seq_length"),           # wrong type
])
def test_config_errors_exit_nonzero_naming_the_field(overrides, world_size, field):
    proc = _run("--config", DEMO_RECIPE, *overrides, world_size=world_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and field in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_and_unknown_algorithm():
    proc = _run("--config", "launch/recipes/no_such_recipe.yaml")
    assert proc.returncode == 2 and "no_such_recipe.yaml" in proc.stderr
    proc = _run("--config", DEMO_RECIPE, "algorithm.name=ppo", world_size=2)
    assert proc.returncode == 2 and "algorithm.name" in proc.stderr


def test_recipes_load_and_validate_at_their_size():
    """Every recipe names its world size in a `# world_size: N` line; it must validate there."""
    from megagsm.config import load_config, validate

    recipes = sorted(glob.glob(os.path.join(REPO, "launch", "recipes", "*.yaml")))
    names = {os.path.basename(r) for r in recipes}
    for expected in ("sft_qwen2.5_0.5b.yaml", "sft_qwen2.5_0.5b_lora.yaml", "sft_qwen2.5_0.5b_sp2.yaml",
                     "sft_qwen2.5_0.5b_sp2_fusedce.yaml", "sft_deepseek_6.7b.yaml", "sft_gemma_2b.yaml",
                     "sft_gemma_7b.yaml", "sft_seed_oss_36b.yaml", "sft_demo_cpu.yaml",
                     "gspo_qwen2.5_3b_math_lora.yaml"):
        assert expected in names
    for recipe in recipes:
        with open(recipe) as f:
            sizes = [int(line.split(":")[1]) for line in f if line.startswith("# world_size:")]
        assert sizes, f"{recipe}: no '# world_size: N' line"
        cfg = load_config(recipe)
        validate(cfg, sizes[0])


def test_print_config_resolves_the_recipe():
    proc = _run("--config", DEMO_RECIPE, "train.train_steps=7", "--print-config", world_size=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_steps: 7" in proc.stdout and "tp: 2" in proc.stdout
