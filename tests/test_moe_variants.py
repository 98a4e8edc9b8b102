"""Slow, exhaustive MoE variants (`make test-slow`): more layer patterns and routing shapes through the
same conversion + logits checks, and the CLI under a real torchrun at EP=2 for both families."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megagsm.testing.multirank import run_ranks
from megagsm.testing.tiny_moe import make_tiny_moe_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
FP32_TOL = 1e-5

# name -> (MOE_CASES entry, overrides)
VARIANTS = {
    # MoE every other layer, counted HF's way ((i + 1) % step == 0): per-layer keys, dense layers 0 and 2
    "qwen3_sparse_step": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    # top-1 without renormalisation (megatron's pre-softmax top-1), tied embeddings
    "qwen3_top1": ("qwen3_moe", dict(num_experts_per_tok=1, norm_topk_prob=False, tie_word_embeddings=True)),
    # every layer MoE: MLA in megatron's stacked layout; no YaRN; one expert group
    "deepseek_v3_all_moe": ("deepseek_v3", dict(first_k_dense_replace=0, n_group=1, topk_group=1,
                                               rope_scaling=None, rope_parameters=None)),
    # V2 group-limited greedy: 4 groups, keep 2, top-2 (groups ranked by their best score)
    "deepseek_v2_groups": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
}


def _variants_in_ranks(root, names, tokens):
    import contextlib
    import io

    from checkpoints_tools import cli
    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.forward import forward_logits
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config
    from megagsm.runtime import init_runtime

    out = {}
    for name in names:
        hf, ckpt = f"{root}/{name}", f"{root}/{name}.mcore"
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["hf-to-mcore", "--hf-dir", hf, "--out", ckpt, "--ep", "2", "--no-progress"],
                            keep_process_group=True)
        assert code == 0, name
        out[name] = {}
        for layout, parallel in {"ep2": ParallelConfig(ep=2), "ep1": ParallelConfig(),
                                 "tp2": ParallelConfig(tp=2), "pp2": ParallelConfig(pp=2)}.items():
            init_runtime(parallel)
            chunks = build_model_from_hf_config(load_hf_config(ckpt), parallel)
            load_mcore_checkpoint(chunks, ckpt)
            out[name][layout] = forward_logits(chunks, tokens, VOCAB)
    return out


@pytest.mark.slow
@pytest.mark.multirank
def test_more_layer_patterns_and_routing_shapes(tmp_path):
    from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf
    from safetensors.torch import load_file

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    refs = {}
    for name, (case, overrides) in VARIANTS.items():
        model = make_tiny_moe_model(case, tmp_path / name, **overrides)
        with torch.no_grad():
            refs[name] = model(tokens).logits.float()
    results = run_ranks(_variants_in_ranks, 2, str(tmp_path), list(VARIANTS), tokens)
    for name in VARIANTS:
        for rank_result in results:
            for layout, got in rank_result[name].items():
                diff = (got - refs[name]).abs().max().item()
                assert diff < FP32_TOL, f"{name} {layout}: {diff}"
        back = tmp_path / f"{name}.back"
        convert_mcore_to_hf(tmp_path / f"{name}.mcore", back, progress=False)
        original, exported = load_file(tmp_path / name / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(original) == sorted(exported)
        assert all(torch.equal(original[k], exported[k]) for k in original), name


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3"])
def test_cli_under_torchrun_at_ep2(tmp_path, case):
    make_tiny_moe_model(case, tmp_path / "hf")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = [str(torchrun), "--nproc-per-node", "2", "-m", "checkpoints_tools"]
    done = subprocess.run([*base, "hf-to-mcore", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "m"),
                           "--ep", "2", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*base, "verify", "--hf-dir", str(tmp_path / "hf"), "--mcore-dir", str(tmp_path / "m"),
                           "--ep", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["layout"]["ep"] == 2 and report["max_abs_logit_diff"] < FP32_TOL
