"""Tiny random-weight Hugging Face models and tokenizers for tests (no downloads).

Weights are fp32 and deliberately "noisy": norms and biases are perturbed away from their
initial values (ones / zeros) so a mapping that drops or swaps them cannot go unnoticed.
"""
from __future__ import annotations

from pathlib import Path

import torch

# one small shape per family: 4 query heads in 2 KV groups, 2 layers (PP=2 takes one each),
# vocab 300 (not a multiple of 128: megatron pads it, differently at TP 1 and 2)
BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILY_OVERRIDES: dict[str, dict] = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    # deepseek-coder style linear rope scaling
    "llama": {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 100000.0},
    "gemma": {"head_dim": 24},                                   # head_dim != hidden / heads
    "seed_oss": {"head_dim": 24, "attention_dropout": 0.1, "residual_dropout": 0.1},
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**BASE, **FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_tokenizer(out_dir, vocab_size: int = 256) -> None:
    """The project's byte-level test tokenizer (round-trips through AutoTokenizer, so text prompts
    work on the converted checkpoints too)."""
    from megagsm.data.tokenizer import save_test_tokenizer

    save_test_tokenizer(out_dir, min(vocab_size, 256))


def make_tiny_hf_model(model_type: str, out_dir, seed: int = 0, tokenizer: bool = True, **overrides):
    """Builds, perturbs and saves a tiny model; returns it (eval mode, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    if tokenizer:
        save_tiny_tokenizer(out_dir)
    return model
