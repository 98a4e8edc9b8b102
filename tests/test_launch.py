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
    """Every recipe sets parallel.world_size; it validates there, and a launch of another size is refused."""
    from megagsm.config import ConfigError, load_config, validate

    recipes = sorted(glob.glob(os.path.join(REPO, "launch", "recipes", "*.yaml")))
    names = {os.path.basename(r) for r in recipes}
    for expected in ("sft_qwen2.5_0.5b.yaml", "sft_qwen2.5_0.5b_lora.yaml", "sft_qwen2.5_0.5b_sp2.yaml",
                     "sft_qwen2.5_0.5b_sp2_fusedce.yaml", "sft_deepseek_6.7b.yaml", "sft_gemma_2b.yaml",
                     "sft_gemma_7b.yaml", "sft_seed_oss_36b.yaml", "sft_demo_cpu.yaml",
                     "gspo_qwen2.5_3b_math_lora.yaml"):
        assert expected in names
    for recipe in recipes:
        cfg = load_config(recipe)
        planned = cfg.parallel.world_size
        assert planned > 0, f"{recipe}: no parallel.world_size"
        validate(cfg, planned, launched=True)
        validate(cfg, None)                       # --print-config under plain python
        with pytest.raises(ConfigError, match=f"parallel.world_size={planned} but this launch has WORLD_SIZE=1"):
            validate(cfg, 1, launched=True)


@pytest.mark.parametrize("recipe", sorted(os.path.basename(r) for r in
                                          glob.glob(os.path.join(REPO, "launch", "recipes", "*.yaml"))))
def test_print_config_under_plain_python(recipe):
    """The README's `python launch/train.py --config R --print-config` works for every recipe."""
    proc = _run("--config", os.path.join("launch", "recipes", recipe), "--print-config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world_size:" in proc.stdout and "Traceback" not in proc.stderr


def test_launch_world_size_must_match_the_recipe():
    proc = _run("--config", DEMO_RECIPE, "--print-config", world_size=4)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: parallel.world_size=2 but this launch has WORLD_SIZE=4 "
                                   "(launch 2 processes, e.g. torchrun --nproc-per-node 2, or set "
                                   "parallel.world_size=4, or 0 for whatever the launch gives)")


def test_print_config_without_a_world_size_skips_the_layout_with_a_note():
    proc = _run("--config", DEMO_RECIPE, "parallel.world_size=0", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert "note: layout not checked against a world size" in proc.stderr and "tp: 2" in proc.stdout
    proc = _run("--config", DEMO_RECIPE, "parallel.world_size=3", "--print-config")
    assert proc.returncode == 2 and "does not divide world_size=3" in proc.stderr


def test_missing_hf_dir_is_one_line_naming_the_path():
    proc = _run("--config", DEMO_RECIPE, "model.hf_dir=/nonexistent", "parallel.world_size=1", "parallel.tp=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: model.hf_dir=/nonexistent: no such directory"), proc.stderr
    assert "Traceback" not in proc.stderr and "Repo id" not in proc.stderr


@pytest.mark.parametrize("value", ["2", "1", "0", "null", "0.5"])
def test_boolean_fields_take_only_booleans(value):
    proc = _run("--config", DEMO_RECIPE, f"parallel.sequence_parallel={value}", "--print-config")
    assert proc.returncode == 2
    assert "parallel.sequence_parallel: expected bool, got" in proc.stderr


def test_print_config_resolves_the_recipe():
    proc = _run("--config", DEMO_RECIPE, "train.train_steps=7", "--print-config", world_size=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_steps: 7" in proc.stdout and "tp: 2" in proc.stdout
