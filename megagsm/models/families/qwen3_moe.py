"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, Qwen3-235B-A22B) and, through `qwen_moe_family`,
Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B).

Attention is Qwen3's (q/k RMSNorm, no bias) or Qwen2's (q/k/v bias). Layer i has experts when it is
not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0; other layers have a dense SwiGLU of
`intermediate_size`. Routing: softmax over `num_experts`, top `num_experts_per_tok`, renormalised when
`norm_topk_prob` (megatron: softmax after top-k; otherwise megatron's pre-softmax). Qwen2-MoE adds a
shared expert of `shared_expert_intermediate_size` behind a sigmoid gate (megatron's shared experts
with moe_shared_expert_gate).
"""
from __future__ import annotations

from functools import partial

from megagsm.models.errors import ModelInputError
from megagsm.models.families import dense, moe
from megagsm.models.families.base import Family, need, reject
from megagsm.models.mapping import WeightMap


def num_experts(hf: dict) -> int:
    return int(moe.need_field(hf, "num_experts", "num_local_experts"))


def layer_pattern(hf: dict) -> list[int]:
    layers = int(moe.need_field(hf, "num_hidden_layers"))
    step = int(hf.get("decoder_sparse_step") or 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense_only if not 0 <= i < layers)
    if bad:
        raise ModelInputError(f"config.json: mlp_only_layers has {bad[0]}, outside 0..{layers - 1}")
    return [int(i not in dense_only and (i + 1) % step == 0) for i in range(layers)]


def qwen_moe_settings(hf: dict, *, qwen2: bool):
    moe.no_quantization(hf)
    dense.no_sliding_window(hf)
    reject(hf, "attention_bias", (None, False), "megatron has no o_proj-only bias")
    s = dense.llama_settings(hf, derived=("head_dim",))  # the MoE attention's hidden / heads fallback
    if qwen2:
        s.config["add_qkv_bias"] = bool(hf.get("qkv_bias", True))
    else:
        s.config["qk_layernorm"] = True
    experts, topk = num_experts(hf), int(moe.need_field(hf, "num_experts_per_tok"))
    router = moe.router_fields(hf, score="softmax", topk=topk, num_experts=experts,
                               normalize=bool(hf.get("norm_topk_prob", False)))
    # required: Qwen2MoeConfig's default (5632) is one model's size, and 0 means no shared expert
    shared = int(need(hf, "shared_expert_intermediate_size")) if qwen2 else 0
    s.config.update(moe.moe_fields(
        hf, num_experts=experts, expert_ffn=int(moe.need_field(hf, "moe_intermediate_size")),
        pattern=layer_pattern(hf), router=router, shared_ffn=shared, shared_gate=True,
    ))
    return s


def qwen_moe_weights(hf: dict, *, qwen2: bool) -> WeightMap:
    base = dense.dense_weights(tied=bool(hf.get("tie_word_embeddings", False)),
                               qkv_bias=qwen2 and bool(hf.get("qkv_bias", True)), qk_norm=not qwen2)
    top, per_layer = moe.split_dense_rules(base.rules)
    shared = qwen2 and bool(hf.get("shared_expert_intermediate_size"))
    per_layer += moe.moe_mlp_rules(shared="shared_expert" if shared else None,
                                   shared_gate="shared_expert_gate" if shared else None)
    return WeightMap(rules=tuple(top + moe.layer_rules(per_layer, layer_pattern(hf))),
                     ignored_hf=base.ignored_hf, tied_hf=base.tied_hf)


def qwen_moe_family(model_type: str, *, qwen2: bool) -> Family:
    return Family(
        model_type=model_type,
        settings=partial(qwen_moe_settings, qwen2=qwen2),
        weights=partial(qwen_moe_weights, qwen2=qwen2),
        layer_spec_fn=moe.layer_spec_fn,
        is_moe=True,
        check_layout=moe.check_expert_layout,
    )


FAMILY = qwen_moe_family("qwen3_moe", qwen2=False)
