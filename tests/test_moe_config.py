"""MoE families without a model run: config translation, refusals of what megatron would compute
differently, YaRN parameters against transformers' own formulas, the weight-rule layouts, MoEConfig."""
from __future__ import annotations

import math

import pytest
import torch

from megagsm.config.moe import MoEConfig
from megagsm.config.parallel import ParallelConfig
from megagsm.models.errors import ModelInputError
from megagsm.models.provider import provider_for
from megagsm.testing.tiny_hf import tiny_config
from megagsm.testing.tiny_moe import MOE_CASES


def hf_config(name: str, **changes) -> dict:
    model_type, overrides = MOE_CASES[name]
    cfg = tiny_config(model_type, **overrides).to_dict()
    cfg.update(changes)
    return cfg  # with its nulls, as save_pretrained writes config.json (an absent field means a default)


def test_routing_translation():
    c = provider_for(hf_config("qwen3_moe")).settings.config
    assert (c["moe_router_score_function"], c["moe_router_pre_softmax"], c["moe_layer_freq"]) == ("softmax", False, 1)
    assert c["moe_shared_expert_intermediate_size"] is None and c["qk_layernorm"]
    c = provider_for(hf_config("qwen2_moe")).settings.config
    assert c["moe_router_pre_softmax"] and c["moe_layer_freq"] == [0, 1, 1] and c["add_qkv_bias"]
    assert c["moe_shared_expert_intermediate_size"] == 48 and c["moe_shared_expert_gate"]
    c = provider_for(hf_config("deepseek_v3")).settings.config
    assert (c["moe_router_score_function"], c["moe_router_enable_expert_bias"]) == ("sigmoid", True)
    assert (c["moe_router_num_groups"], c["moe_router_group_topk"], c["moe_router_topk"]) == (4, 2, 4)
    assert c["moe_router_topk_scaling_factor"] == 2.5 and c["moe_router_dtype"] == "fp32"
    assert c["moe_shared_expert_intermediate_size"] == 32 and c["moe_layer_freq"] == [0, 1]
    assert c["q_lora_rank"] == 32 and c["rope_type"] == "yarn" and c["multi_latent_attention"]
    c = provider_for(hf_config("deepseek_v2")).settings.config
    assert c["q_lora_rank"] is None and c["moe_router_pre_softmax"] and "moe_router_num_groups" not in c
    assert c["moe_shared_expert_intermediate_size"] == 64 and c["moe_router_topk_scaling_factor"] == 1.5


def test_qwen_layer_pattern_follows_hf():
    from megagsm.models.families.qwen3_moe import layer_pattern

    # HF: MoE when (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers
    assert layer_pattern({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [5]}) == [0, 1, 0, 1, 0, 0]
    with pytest.raises(ModelInputError, match="mlp_only_layers has 7"):
        layer_pattern({"num_hidden_layers": 6, "mlp_only_layers": [7]})


REFUSED = [
    ("qwen3_moe", dict(num_experts_per_tok=1, norm_topk_prob=True), "norm_topk_prob=true with num_experts_per_tok=1"),
    ("qwen3_moe", dict(use_sliding_window=True), "use_sliding_window"),
    ("qwen3_moe", dict(mlp_only_layers=[0, 1]), "no layer of this 'qwen3_moe' model has experts"),
    ("qwen3_moe", dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob=false with num_experts_per_tok=4 and sigmoid"),
    ("deepseek_v3", dict(num_experts_per_tok=6), "best 2 score(s), megatron by their best"),
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave"),
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads"),
    ("deepseek_v3", dict(attention_bias=True), "attention_bias"),
    ("deepseek_v3", dict(n_shared_experts=0), "n_shared_experts=0"),
    ("deepseek_v3", dict(rope_scaling={"type": "dynamic", "factor": 2.0}, rope_parameters=None), "'dynamic'"),
    ("deepseek_v3", dict(rope_scaling={"type": "yarn", "factor": 4.0, "truncate": False,
                                       "original_max_position_embeddings": 4096}, rope_parameters=None), "truncate"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=2),
     "best 1 score(s), megatron by their best num_experts_per_tok // topk_group = 2"),
    ("deepseek_v2", dict(moe_layer_freq=2), "moe_layer_freq"),
]


@pytest.mark.parametrize("name,changes,message", REFUSED, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in REFUSED])
def test_unsupported_options_are_refused(name, changes, message):
    with pytest.raises(ModelInputError) as err:
        provider_for(hf_config(name, **changes))
    assert message in str(err.value)


def test_supported_group_routing_variants():
    # V2 group_limited_greedy picks groups by their best score: megatron's top-(k // groups) with k // groups == 1
    c = provider_for(hf_config("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)).settings.config
    assert (c["moe_router_num_groups"], c["moe_router_group_topk"]) == (4, 2)
    # one group is no grouping
    c = provider_for(hf_config("deepseek_v3", n_group=1, topk_group=1)).settings.config
    assert "moe_router_num_groups" not in c


def test_expert_layout_checks():
    provider = provider_for(hf_config("qwen3_moe"))
    provider.check_layout(ParallelConfig(ep=8))
    with pytest.raises(ModelInputError, match="8 routed experts do not split over ep=3"):
        provider.check_layout(ParallelConfig(ep=3))
    with pytest.raises(ModelInputError, match="moe_intermediate_size=32 is not divisible by the expert tensor"):
        provider.check_layout(ParallelConfig(ep=1, etp=3, tp=1))


def test_weight_rules_stacked_and_per_layer():
    all_moe = {r.mcore: r for r in provider_for(hf_config("qwen3_moe")).weight_map.rules}
    rule = all_moe["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert rule.axes == ("layer", "expert") and rule.hf_names((1, 7)) == [
        "model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.experts.7.up_proj.weight"]
    assert "decoder.layers.pre_mlp_layernorm.weight" in all_moe
    assert "decoder.layers.mlp.linear_fc1.weight" not in all_moe      # no dense layers
    mixed = {r.mcore: r for r in provider_for(hf_config("qwen2_moe")).weight_map.rules}
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in mixed           # layer 0 is dense
    assert "decoder.layers.0.mlp.router.weight" not in mixed
    rule = mixed["decoder.layers.2.mlp.experts.experts.linear_fc2.weight"]
    assert rule.axes == ("expert",) and rule.hf_names((3,)) == ["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert mixed["decoder.layers.1.mlp.shared_experts.gate_weight"].hf == ("model.layers.1.mlp.shared_expert_gate.weight",)
    mla = {r.mcore for r in provider_for(hf_config("deepseek_v3")).weight_map.rules}
    assert {"decoder.layers.1.mlp.router.expert_bias", "decoder.layers.0.input_layernorm.weight",
            "decoder.layers.1.self_attention.linear_q_up_proj.layer_norm_weight"} <= mla
    assert "decoder.layers.0.self_attention.linear_q_proj.weight" in {
        r.mcore for r in provider_for(hf_config("deepseek_v2")).weight_map.rules}


def test_mtp_tensors_are_skipped_not_ignored():
    weight_map = provider_for(hf_config("deepseek_v3", num_nextn_predict_layers=1)).weight_map
    (pattern, why), = weight_map.skipped_hf.items()
    assert "multi-token-prediction" in why
    import re

    assert re.fullmatch(pattern, "model.layers.2.eh_proj.weight")
    assert not re.fullmatch(pattern, "model.layers.1.mlp.gate.weight")
    # DeepSeek-V2 has no MTP layers (DeepseekV2Config has no such field): a tensor past the last
    # layer is an unmapped tensor there, never silently skipped
    assert provider_for(hf_config("deepseek_v2")).weight_map.skipped_hf == {}


YARN = [
    {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0},       # DeepSeek-V3
    {"factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707},   # DeepSeek-V2 / V2-Lite
    {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"factor": 4.0, "mscale_all_dim": 1.0},                       # no mscale: transformers ignores all_dim for cos/sin
    {"factor": 4.0, "attention_factor": 1.2, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 2.0, "beta_fast": 16, "beta_slow": 2},
    {"factor": 0.5},                                              # a factor <= 1 scales nothing (mscale 1)
    # default beta_fast / beta_slow (32 / 1): at this original length the correction range starts at
    # dimension floor(10.05) = 10, where beta_fast 33 would give 9
    {"factor": 4.0, "original_max_position_embeddings": 3630},
]


@pytest.mark.parametrize("params", YARN, ids=range(len(YARN)))
def test_yarn_matches_transformers(params, monkeypatch):
    """Frequencies, cos/sin factor and softmax scale of megatron's MLA YaRN vs transformers'."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    from megatron.core.transformer.multi_latent_attention import _yarn_get_mscale
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from megagsm.models.families.deepseek import rope_fields

    # megatron's YaRN module places its tables on torch.cuda.current_device()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
            **{k: v for k, v in params.items() if v is not None}}
    hf = DeepseekV3Config(qk_rope_head_dim=64, qk_nope_head_dim=128, max_position_embeddings=163840,
                          rope_parameters=dict(rope))
    inv_freq, cos_sin_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    softmax_scale = yarn_apply_mscale(hf.rope_parameters, 192 ** -0.5)

    f = rope_fields(hf.to_dict())
    assert f["rope_type"] == "yarn"
    ours = YarnRotaryEmbedding(64, rotary_base=f["rotary_base"], scaling_factor=f["rotary_scaling_factor"],
                               original_max_position_embeddings=f["original_max_position_embeddings"],
                               beta_fast=f["beta_fast"], beta_slow=f["beta_slow"], mscale=f["mscale"],
                               mscale_all_dim=f["mscale_all_dim"], use_cpu_initialization=True)
    emb, concentration = ours(2)
    torch.testing.assert_close(emb[1, 0, 0, :32], inv_freq, rtol=1e-6, atol=0)
    assert math.isclose(concentration, cos_sin_factor, rel_tol=1e-9)
    ours_scale = _yarn_get_mscale(f["rotary_scaling_factor"], f["mscale_all_dim"]) ** 2 / math.sqrt(192)
    assert math.isclose(ours_scale, softmax_scale, rel_tol=1e-9)


def test_moe_config_overrides():
    assert MoEConfig().overrides() == dict(
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None, moe_router_bias_update_rate=0.0, moe_expert_capacity_factor=None)
    o = MoEConfig(load_balancing="seq_aux_loss", aux_loss_coeff=1e-4, grouped_gemm="off", router_dtype="fp64",
                  expert_bias_update_rate=1e-3).overrides()
    assert o["moe_grouped_gemm"] is False and o["moe_router_dtype"] == "fp64"
    assert o["moe_router_load_balancing_type"] == "seq_aux_loss" and o["moe_router_bias_update_rate"] == 1e-3
    with pytest.raises(ValueError, match="aux_loss_coeff is set but model.moe.load_balancing is 'none'"):
        MoEConfig(aux_loss_coeff=0.01).overrides()
    with pytest.raises(ValueError, match="needs aux_loss_coeff > 0"):
        MoEConfig(load_balancing="aux_loss").overrides()
