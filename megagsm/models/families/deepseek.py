"""DeepSeek V2 / V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): multi-latent attention and
fine-grained experts with shared experts. `deepseek_v2` and `deepseek_v3` expose the two families.

Attention (megatron's MLASelfAttention, MLATransformerConfig):
  q_a_proj -> linear_q_down_proj, q_a_layernorm -> q latent norm, q_b_proj -> linear_q_up_proj, or
  q_proj -> linear_q_proj when q_lora_rank is null (V2-Lite); kv_a_proj_with_mqa -> linear_kv_down_proj
  ([kv latent; shared rope key] rows, as megatron splits them), kv_a_layernorm -> kv latent norm,
  kv_b_proj -> linear_kv_up_proj (per head [k_nope; v], as megatron views it), o_proj -> linear_proj.
  qk_nope_head_dim -> qk_head_dim, qk_rope_head_dim -> qk_pos_emb_head_dim. Rotary pairs are
  interleaved (V2's complex rotation, V3's rope_interleave=true): megatron's MLA rotary does the same.
  YaRN (rope_scaling type yarn) -> megatron's YaRN with the same frequencies, cos/sin factor and
  softmax scale (checked against transformers' formulas, see `rope_fields`).
Layers: the first `first_k_dense_replace` have a dense SwiGLU of `intermediate_size`; the others
route over `n_routed_experts` and add `n_shared_experts` * `moe_intermediate_size` shared experts.
MTP modules (num_nextn_predict_layers, HF layers >= num_hidden_layers) are not converted (hf-to-mcore warns
when present): the megatron model is built without them, as transformers builds it.
"""
from __future__ import annotations

import math

from megagsm.models.errors import ModelInputError
from megagsm.models.families import dense, moe
from megagsm.models.families.base import ModelSettings, need, present, reject
from megagsm.models.gpt import GPTArchitecture
from megagsm.models.mapping import WeightMap, WeightRule


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_fields(hf: dict) -> dict:
    """MLATransformerConfig rope fields for the HF rope settings (transformers <5 `rope_theta` +
    `rope_scaling`, or >=5 `rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        # rotary_scaling_factor 1: megatron's MLA softmax scale keeps 1/sqrt(head dim)
        return dict(rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0)
    if kind != "yarn":
        raise ModelInputError(f"config.json: rope scaling type {kind!r} is not supported for "
                              f"{hf.get('model_type')!r} (supported: default, yarn)")
    if scaling.get("truncate", True) is False:
        raise ModelInputError("config.json: rope_scaling.truncate=false is not supported "
                              "(megatron rounds the YaRN correction range)")
    # transformers' precedence: a top-level field, then the rope dict, then max_position_embeddings
    original = int(hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                   or need(hf, "max_position_embeddings"))
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else int(need(hf, "max_position_embeddings")) / original
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    # transformers: cos/sin carry `attention_factor`; the softmax scale is multiplied by
    # mscale(factor, mscale_all_dim)^2 whenever mscale_all_dim is set (yarn_apply_mscale)
    hf_cos_sin = scaling.get("attention_factor")
    if hf_cos_sin is None:
        hf_cos_sin = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim) if mscale and all_dim
                      else _yarn_mscale(factor))
    # megatron: cos/sin carry mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the softmax
    # scale mscale(factor, mscale_all_dim)^2: solve its `mscale` for transformers' cos/sin factor
    mg_all_dim = float(all_dim or 0.0)
    if mscale and all_dim and scaling.get("attention_factor") is None:
        mg_mscale = float(mscale)
    elif factor > 1:
        mg_mscale = (hf_cos_sin * _yarn_mscale(factor, mg_all_dim) - 1.0) / (0.1 * math.log(factor))
    elif hf_cos_sin != 1.0:
        raise ModelInputError(f"config.json: rope_scaling attention_factor={hf_cos_sin} with factor "
                              f"{factor} <= 1 is not supported")
    else:
        mg_mscale = 1.0
    got = _yarn_mscale(factor, mg_mscale) / _yarn_mscale(factor, mg_all_dim)
    if not math.isclose(got, hf_cos_sin, rel_tol=1e-12):
        raise ModelInputError(f"config.json: rope_scaling yarn attention factor {hf_cos_sin} is not "
                              "reachable with megatron's YaRN parameters")
    return dict(
        rope_type="yarn", rotary_base=theta, rotary_scaling_factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=mg_mscale, mscale_all_dim=mg_all_dim,
    )


def layer_pattern(hf: dict) -> list[int]:
    layers = int(need(hf, "num_hidden_layers"))
    first_dense = int(need(hf, "first_k_dense_replace"))
    # the original remote code also had moe_layer_freq; transformers ignores it
    reject(hf, "moe_layer_freq", (None, 1), "only every layer after first_k_dense_replace may have experts")
    return [int(i >= first_dense) for i in range(layers)]


def mla_settings(hf: dict) -> ModelSettings:
    """Everything but the routing: attention, shapes, dense/MoE layout."""
    moe.no_quantization(hf)
    hidden, heads = int(need(hf, "hidden_size")), int(need(hf, "num_attention_heads"))
    need(hf, "num_key_value_heads")
    reject(hf, "num_key_value_heads", lambda v: v == heads,
           "multi-latent attention gives every head its own keys and values")
    reject(hf, "attention_bias", (None, False), "megatron's MLA projections have no bias")
    reject(hf, "mlp_bias", (None, False))
    reject(hf, "rope_interleave", (None, True), "megatron's MLA rotates interleaved rotary pairs")
    reject(hf, "partial_rotary_factor", (None, 1, 1.0))
    q_lora = present(hf, "q_lora_rank")
    v_head = int(need(hf, "v_head_dim"))
    config = dict(
        num_layers=int(need(hf, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need(hf, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=v_head,
        multi_latent_attention=True,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(need(hf, "kv_lora_rank")),
        qk_head_dim=int(need(hf, "qk_nope_head_dim")),
        qk_pos_emb_head_dim=int(need(hf, "qk_rope_head_dim")),
        v_head_dim=v_head,
        qk_layernorm=True,   # builds the q/kv latent norms
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=dense.activation(hf),
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        **rope_fields(hf),
    )
    arch = GPTArchitecture(
        vocab_size=int(need(hf, "vocab_size")),
        max_sequence_length=int(need(hf, "max_position_embeddings")),
        position_embedding_type="rope",   # MLA builds its own rotary embedding from the config
        rotary_base=config["rotary_base"],
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
    )
    return ModelSettings(config=config, arch=arch)


def num_experts(hf: dict) -> int:
    return int(moe.need_field(hf, "n_routed_experts", "num_local_experts", "num_experts"))


def with_experts(hf: dict, settings: ModelSettings, router: dict) -> ModelSettings:
    """Adds the MoE fields (shapes from the config, routing from the family) to MLA settings."""
    shared = int(need(hf, "n_shared_experts"))
    if shared < 1:
        raise ModelInputError(f"config.json: n_shared_experts={hf.get('n_shared_experts')!r}: "
                              f"{hf.get('model_type')!r} models have at least one shared expert")
    expert_ffn = int(need(hf, "moe_intermediate_size"))
    # transformers computes DeepSeek router logits and scores in fp32 whatever the model dtype
    settings.config.update(moe.moe_fields(
        hf, num_experts=num_experts(hf), expert_ffn=expert_ffn, pattern=layer_pattern(hf), router=router,
        shared_ffn=shared * expert_ffn, router_dtype="fp32"))
    return settings


def mla_weights(hf: dict, *, expert_bias: bool, mtp_default: int = 0) -> WeightMap:
    """mtp_default: num_nextn_predict_layers when config.json omits it (the family's transformers default)."""
    L = moe.layer
    attention = [
        L("input_layernorm.weight", "input_layernorm.weight"),
        L("self_attention.linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"),
        L("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attn.kv_a_layernorm.weight"),
        L("self_attention.linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"),
        L("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ]
    if present(hf, "q_lora_rank"):
        attention += [
            L("self_attention.linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
            L("self_attention.linear_q_up_proj.layer_norm_weight", "self_attn.q_a_layernorm.weight"),
            L("self_attention.linear_q_up_proj.weight", "self_attn.q_b_proj.weight"),
        ]
    else:
        attention.append(L("self_attention.linear_q_proj.weight", "self_attn.q_proj.weight"))
    per_layer = [(r, moe.ALL) for r in attention] + moe.dense_mlp_rules()
    per_layer += moe.moe_mlp_rules(shared="shared_experts", expert_bias=expert_bias, fp32_router=True)
    tied = bool(hf.get("tie_word_embeddings", False))
    top = [
        WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
        WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not tied:
        top.append(WeightRule("output_layer.weight", ("lm_head.weight",), vocab=True))
    layers = int(need(hf, "num_hidden_layers"))
    mtp = int(moe.field(hf, "num_nextn_predict_layers", "num_mtp_layers", default=mtp_default))
    skipped = {p: (f"multi-token-prediction layers (num_nextn_predict_layers={mtp}) are not converted: "
                   "the megatron model has no MTP head, as transformers' has none")
               for p in moe.extra_layers_ignored(layers, mtp)}
    return WeightMap(
        rules=tuple(top + moe.layer_rules(per_layer, layer_pattern(hf))),
        ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        skipped_hf=skipped,
        tied_hf={"lm_head.weight": "model.embed_tokens.weight"} if tied else {},
    )
