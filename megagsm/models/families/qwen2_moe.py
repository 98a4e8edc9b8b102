"""Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2 attention (q/k/v bias from `qkv_bias`), routed experts as in
Qwen3-MoE plus one shared expert behind a sigmoid gate. See qwen3_moe for the shared code."""
from megagsm.models.families.qwen3_moe import qwen_moe_family

FAMILY = qwen_moe_family("qwen2_moe", qwen2=True)
