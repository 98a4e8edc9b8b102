"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama layers with a bias on q/k/v (always, no config field)."""
from megagsm.models.families import dense

# Qwen2Config has no head_dim field: hidden_size / num_attention_heads
FAMILY = dense.llama_variant("qwen2", config={"add_qkv_bias": True}, weights={"qkv_bias": True},
                             derived=("head_dim",))
