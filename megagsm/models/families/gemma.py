"""Gemma v1 (GemmaForCausalLM).

- RMSNorm scales by (1 + w): megatron's layernorm_zero_centered_gamma, so weights copy unchanged.
- Embeddings are multiplied by sqrt(hidden_size) rounded to the embedding dtype first (bf16 turns
  sqrt(3072) into 55.5). megatron's GPTModel has no such option, so `post_build` adds a forward hook
  on the embedding module: weights stay untouched (bit-exact round trip), and the hook runs wherever
  the embedding runs (training, PP first stage, inference).
- GeGLU with the tanh GELU; the legacy value hidden_act="gelu" means the tanh form as well, as in
  transformers. Tied embeddings by default, head_dim 256 in the public models.
"""
import math

import torch

from megagsm.models.families import dense
from megagsm.models.families.base import Family, reject


def settings(hf: dict):
    # transformers 4.x had a separate `hidden_activation`; both name the tanh GELU in practice
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":
        act = "gelu_pytorch_tanh"
    reject(hf, "attention_bias", (None, False), "megatron has no o_proj-only bias")
    s = dense.llama_settings({**hf, "hidden_act": act}, tied_default=True)
    s.config["layernorm_zero_centered_gamma"] = True
    return s


def weights(hf: dict):
    return dense.dense_weights(tied=bool(hf.get("tie_word_embeddings", True)))


def _scale_embeddings(module, inputs, output):
    scale = torch.tensor(math.sqrt(module.config.hidden_size), dtype=module.word_embeddings.weight.dtype)
    return output * scale.to(output.device, output.dtype)


def post_build(model, hf: dict) -> None:
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(_scale_embeddings)


FAMILY = Family(model_type="gemma", settings=settings, weights=weights, post_build=post_build)
