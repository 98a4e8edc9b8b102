"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama layers with a bias on q/k/v (always, no config field)."""
from megagsm.models.families import dense
from megagsm.models.families.base import Family


def settings(hf: dict):
    dense.no_sliding_window(hf)
    s = dense.llama_settings(hf)
    s.config["add_qkv_bias"] = True
    return s


def weights(hf: dict):
    return dense.dense_weights(tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=True)


FAMILY = Family(model_type="qwen2", settings=settings, weights=weights)
