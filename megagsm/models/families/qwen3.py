"""Qwen3 (Qwen3ForCausalLM): Llama layers with per-head RMSNorm on queries and keys before rotary
(megatron's qk_layernorm), head_dim given explicitly."""
from megagsm.models.families import dense

FAMILY = dense.llama_variant(
    "qwen3", config={"qk_layernorm": True}, weights={"qk_norm": True},
    # attention_bias puts a bias on o_proj too, which megatron only has together with MLP biases
    reject_fields=(("attention_bias", (None, False), "megatron has no o_proj-only bias"),))
