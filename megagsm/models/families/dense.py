"""Shared pieces of the Llama-shaped dense families (Llama, Qwen2/2.5, Qwen3, Seed-OSS, Gemma):
pre-norm decoder layers with RMSNorm, rotary attention with grouped query heads and a gated MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megagsm.models.errors import ModelInputError
from megagsm.models.families.base import Family, ModelSettings, need, reject
from megagsm.models.gpt import GPTArchitecture
from megagsm.models.mapping import WeightMap, WeightRule


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF "gelu_pytorch_tanh"), a named function so configs pickle."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": gelu_tanh}


def activation(hf: dict, field: str = "hidden_act"):
    name = hf.get(field) or "silu"
    if name not in ACTIVATIONS:
        raise ModelInputError(
            f"config.json: {field}={name!r} is not supported for model_type {hf.get('model_type')!r} "
            f"(supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    return ACTIVATIONS[name]


def rope_fields(hf: dict) -> dict:
    """GPTArchitecture rope fields from either config layout: transformers<5 (`rope_theta`,
    `rope_scaling`) or transformers>=5 (`rope_parameters` holding both)."""
    params = hf.get("rope_parameters") or {}
    if params and not isinstance(params.get("rope_theta", 0.0), (int, float)):
        raise ModelInputError("config.json: per-layer-type rope_parameters are not supported")
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    out = {"rotary_base": float(theta)}
    if kind == "default":
        pass
    elif kind == "linear":
        # HF divides inv_freq by the factor; megatron divides positions: the same product
        out["seq_len_interpolation_factor"] = float(scaling["factor"])
    elif kind == "llama3":
        recipe = (scaling.get("low_freq_factor"), scaling.get("high_freq_factor"),
                  scaling.get("original_max_position_embeddings"))
        if recipe != (1, 4, 8192):  # megatron's RotaryEmbedding hard-codes this recipe
            raise ModelInputError(
                f"config.json: rope_scaling llama3 with low/high_freq_factor, original_max_position_"
                f"embeddings={recipe} is not supported (megatron implements (1, 4, 8192) only)"
            )
        out.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    else:
        raise ModelInputError(
            f"config.json: rope scaling type {kind!r} is not supported for model_type "
            f"{hf.get('model_type')!r} (supported: default, linear, llama3)"
        )
    reject(hf, "partial_rotary_factor", lambda v: v in (None, 1, 1.0))
    return out


def llama_settings(hf: dict, *, tied_default: bool = False, derived: tuple[str, ...] = ()) -> ModelSettings:
    """TransformerConfig kwargs + GPTArchitecture shared by the Llama-shaped families.

    derived: which of head_dim / num_key_value_heads the family's transformers config class derives
    when config.json omits them (hidden_size / num_attention_heads, num_attention_heads); the others
    are required, since there the class substitutes a fixed default of its own (Qwen2's 32 KV heads,
    Gemma's head_dim 256...) that says nothing about the checkpoint at hand."""
    hidden, heads = int(need(hf, "hidden_size")), int(need(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") or (hidden // heads if "head_dim" in derived else need(hf, "head_dim"))
    kv_heads = hf.get("num_key_value_heads") or (heads if "num_key_value_heads" in derived
                                                 else need(hf, "num_key_value_heads"))
    config = dict(
        num_layers=int(need(hf, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need(hf, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(kv_heads),
        kv_channels=int(head_dim),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=activation(hf),
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    if heads % config["num_query_groups"]:
        raise ModelInputError(
            f"config.json: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={config['num_query_groups']}"
        )
    arch = GPTArchitecture(
        vocab_size=int(need(hf, "vocab_size")),
        max_sequence_length=int(need(hf, "max_position_embeddings")),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", tied_default)),
        **rope_fields(hf),
    )
    return ModelSettings(config=config, arch=arch)


def no_sliding_window(hf: dict) -> None:
    reject(hf, "use_sliding_window", (None, False), "sliding-window attention is not implemented")


def dense_weights(
    *, tied: bool, qkv_bias: bool = False, linear_bias: bool = False, qk_norm: bool = False
) -> WeightMap:
    """The Llama-shaped mapping. linear_bias: biases on o_proj and the MLP (megatron's add_bias_linear
    covers all three, so a family needs them all or none)."""

    def layer(mcore: str, *hf: str, transform: str = "copy") -> WeightRule:
        return WeightRule(
            f"decoder.layers.{mcore}", tuple(f"model.layers.{{layer}}.{h}" for h in hf), transform, ("layer",)
        )

    rules = [
        WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
        layer("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
        layer("self_attention.linear_qkv.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
              "self_attn.v_proj.weight", transform="qkv"),
        layer("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
        layer("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        layer("mlp.linear_fc1.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", transform="gate_up"),
        layer("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
        WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if qkv_bias:
        rules.append(layer("self_attention.linear_qkv.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                           "self_attn.v_proj.bias", transform="qkv"))
    if linear_bias:
        rules += [
            layer("self_attention.linear_proj.bias", "self_attn.o_proj.bias"),
            layer("mlp.linear_fc1.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias", transform="gate_up"),
            layer("mlp.linear_fc2.bias", "mlp.down_proj.bias"),
        ]
    if qk_norm:
        rules += [
            layer("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
            layer("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
        ]
    if not tied:
        rules.append(WeightRule("output_layer.weight", ("lm_head.weight",), vocab=True))
    return WeightMap(
        rules=tuple(rules),
        # derived rotary buffers some older checkpoints carry; megatron recomputes them
        ignored_hf=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        tied_hf={"lm_head.weight": "model.embed_tokens.weight"} if tied else {},
    )


def llama_variant(model_type: str, *, config: dict, weights: dict, reject_fields: tuple = (),
                  derived: tuple[str, ...] = ()) -> Family:
    """A family that is Llama layers plus fixed megatron config flags (`config`) and the matching
    weight rules (`weights`: dense_weights options); `reject_fields`: (field, allowed, why) rows;
    `derived`: see llama_settings."""

    def settings(hf: dict) -> ModelSettings:
        no_sliding_window(hf)
        for field, allowed, why in reject_fields:
            reject(hf, field, allowed, why)
        s = llama_settings(hf, derived=derived)
        s.config.update(config)
        return s

    def weight_map(hf: dict) -> WeightMap:
        return dense_weights(tied=bool(hf.get("tie_word_embeddings", False)), **weights)

    return Family(model_type=model_type, settings=settings, weights=weight_map)
