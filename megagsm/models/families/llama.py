"""Llama (LlamaForCausalLM), which also covers deepseek-llm-7b and deepseek-coder-6.7b.

rope_scaling: "linear" (deepseek-coder: factor 4) becomes megatron's seq_len_interpolation_factor,
"llama3" megatron's rope_scaling. Biases: HF's attention_bias covers q/k/v/o and mlp_bias the MLP;
megatron's add_bias_linear covers o_proj and the MLP together, so both or neither."""
from megagsm.models.errors import ModelInputError
from megagsm.models.families import dense
from megagsm.models.families.base import Family


def _biases(hf: dict) -> bool:
    attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attn != mlp:
        raise ModelInputError(
            f"config.json: attention_bias={attn} with mlp_bias={mlp} is not supported "
            "(megatron's add_bias_linear puts biases on o_proj and the MLP together)"
        )
    return attn


def settings(hf: dict):
    # LlamaConfig: no head_dim -> hidden_size / num_attention_heads, no num_key_value_heads -> MHA
    s = dense.llama_settings(hf, derived=("head_dim", "num_key_value_heads"))
    bias = _biases(hf)
    s.config.update(add_qkv_bias=bias, add_bias_linear=bias)
    return s


def weights(hf: dict):
    bias = _biases(hf)
    return dense.dense_weights(
        tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, linear_bias=bias
    )


FAMILY = Family(model_type="llama", settings=settings, weights=weights)
