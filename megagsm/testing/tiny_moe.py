"""Tiny random-weight mixture-of-experts HF models for tests: Qwen3-MoE, Qwen2-MoE, DeepSeek V2/V3.

On top of tiny_hf's perturbed norms and biases:
- router weights are scaled up, so routing scores are well separated: a top-k choice never hinges on
  a last-bit difference between two implementations (HF's default init gives near-uniform scores);
- DeepSeek-V3's `e_score_correction_bias` is made non-zero, so a mapping that drops it changes routing.
Shapes: hidden 64, 4 heads, 8 experts, top-k 2 (4 for V3's group-limited routing), vocab 300.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megagsm.testing.tiny_hf import make_tiny_hf_model

ROUTER_GAIN = 50.0

_MLA = dict(kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
            moe_intermediate_size=32, n_routed_experts=8, max_position_embeddings=16384)


def _yarn(factor, mscale, mscale_all_dim):
    return {"type": "yarn", "factor": factor, "beta_fast": 32, "beta_slow": 1, "mscale": mscale,
            "mscale_all_dim": mscale_all_dim, "original_max_position_embeddings": 4096}

# name -> (HF model_type, config overrides)
MOE_CASES: dict[str, tuple[str, dict]] = {
    # Qwen3-30B-A3B shape: every layer MoE (megatron's stacked checkpoint layout), renormalised top-k
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    # dense layer 0 (per-layer checkpoint keys), un-normalised top-k, gated shared expert, qkv bias
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    norm_topk_prob=False, mlp_only_layers=[0])),
    # V3: q LoRA, first layer dense, sigmoid + bias, 4 groups keep 2, top-4, scaling 2.5; YaRN with
    # mscale != mscale_all_dim, so both the cos/sin factor and the softmax scale differ from 1
    "deepseek_v3": ("deepseek_v3", dict(**_MLA, q_lora_rank=32, num_experts_per_tok=4, n_shared_experts=1,
                                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                        first_k_dense_replace=1, rope_scaling=_yarn(4.0, 1.0, 0.707))),
    # V2-Lite: no q LoRA, softmax greedy top-2 un-normalised, 2 shared experts, scaling, its YaRN
    "deepseek_v2": ("deepseek_v2", dict(**_MLA, q_lora_rank=None, num_experts_per_tok=2, n_shared_experts=2,
                                        topk_method="greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                                        rope_scaling=_yarn(40.0, 0.707, 0.707))),
}


def make_tiny_moe_model(name: str, out_dir, seed: int = 0, **overrides):
    """Builds, perturbs and saves MOE_CASES[name] (with overrides); returns the model (eval, fp32)."""
    model_type, base = MOE_CASES[name]
    model = make_tiny_hf_model(model_type, out_dir, seed=seed, **{**base, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_GAIN)
        for buffer_name, b in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    model.save_pretrained(str(Path(out_dir)))
    return model
