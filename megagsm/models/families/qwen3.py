"""Qwen3 (Qwen3ForCausalLM): Llama layers with per-head RMSNorm on queries and keys before rotary
(megatron's qk_layernorm), head_dim given explicitly."""
from megagsm.models.families import dense
from megagsm.models.families.base import Family, reject


def settings(hf: dict):
    dense.no_sliding_window(hf)
    # attention_bias puts a bias on o_proj too, which megatron only has together with MLP biases
    reject(hf, "attention_bias", (None, False), "megatron has no o_proj-only bias")
    s = dense.llama_settings(hf)
    s.config["qk_layernorm"] = True
    return s


def weights(hf: dict):
    return dense.dense_weights(tied=bool(hf.get("tie_word_embeddings", False)), qk_norm=True)


FAMILY = Family(model_type="qwen3", settings=settings, weights=weights)
