"""Seed-OSS (SeedOssForCausalLM): Llama layers with q/k/v bias (attention_bias), no o_proj bias
(attention_out_bias), no MLP bias, head_dim independent of hidden_size / num_attention_heads.
Its config sets attention/residual dropout 0.1; megagsm builds with dropout 0 unless overridden."""
from megagsm.models.errors import ModelInputError
from megagsm.models.families import dense
from megagsm.models.families.base import Family


def _biases(hf: dict) -> tuple[bool, bool]:
    qkv = bool(hf.get("attention_bias", True))
    out, mlp = bool(hf.get("attention_out_bias", False)), bool(hf.get("mlp_bias", False))
    if out != mlp:
        raise ModelInputError(
            f"config.json: attention_out_bias={out} with mlp_bias={mlp} is not supported "
            "(megatron's add_bias_linear puts biases on o_proj and the MLP together)"
        )
    return qkv, out


def settings(hf: dict):
    s = dense.llama_settings(hf)
    qkv, linear = _biases(hf)
    s.config.update(add_qkv_bias=qkv, add_bias_linear=linear)
    return s


def weights(hf: dict):
    qkv, linear = _biases(hf)
    return dense.dense_weights(
        tied=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv, linear_bias=linear
    )


FAMILY = Family(model_type="seed_oss", settings=settings, weights=weights)
