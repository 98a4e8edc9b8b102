"""Builds this rank's model chunks from a RunConfig's `model` section, for the SFT and GSPO trainers.

Every model is described by a Hugging Face config (read from `model.hf_dir`, or made from the size
fields with `transformers.AutoConfig.for_model(model.family, ...)`), so the final HF export always
has the config it needs. The HF config -> megatron TransformerConfig mapping and the weight loading
belong to the converters (`megagsm.models.provider`, branch `convert`); until that module is present,
a built-in mapping covers the Llama-style families (llama, qwen2) with random weights, which is all
the CPU demo and the tests need.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.config.errors import ConfigError
from megagsm.config.model import ModelConfig
from megagsm.config.parallel import ParallelConfig
from megagsm.models.gpt import GPTArchitecture, build_model_chunks
from megagsm.models.training import parallel_fields

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ModelConfig size field -> HF config key (Llama-style names, which every supported family shares)
_HF_SIZE_KEYS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim", "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings", "num_experts": "num_experts",
    "moe_router_topk": "num_experts_per_tok", "tie_word_embeddings": "tie_word_embeddings",
}
_BUILTIN_FAMILIES = ("qwen2", "llama")


@dataclass
class BuiltModel:
    chunks: list                 # this rank's GPTModel chunks (one per virtual pipeline stage)
    hf_config: Any               # the HF config the weights follow (for export): a dict from the
                                 # converters' provider, a transformers config on the built-in path
    family: str
    dtype: torch.dtype
    pretrained: bool             # weights came from a checkpoint (model.init=hf or model.load)


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """model.dtype=auto: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[model.dtype]


def _provider():
    try:
        from megagsm.models import provider  # branch `convert`
    except ImportError:
        return None
    return provider


def hf_config_for(model: ModelConfig):
    """The HF config the model follows: hf_dir's config.json with explicit sizes on top, or one made
    from the sizes and model.family."""
    from transformers import AutoConfig

    overrides = {_HF_SIZE_KEYS[k]: v for k, v in model.explicit_sizes().items()}
    if model.hf_dir:
        path = os.path.join(model.hf_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model.hf_dir={model.hf_dir}: no config.json there")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        family = model.family or raw.get("model_type")
        raw.update(overrides)
        raw.pop("model_type", None)
        return AutoConfig.for_model(family, **raw)
    if "num_key_value_heads" not in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    try:
        return AutoConfig.for_model(model.family, **overrides)
    except ValueError as e:
        raise ConfigError(f"model.family={model.family!r}: {e}") from None


def transformer_config_from_hf(hf_config, parallel: ParallelConfig, dtype: torch.dtype,
                               device: torch.device, recompute: str = "none") -> TransformerConfig:
    """Built-in HF -> megatron mapping for Llama-style dense families (used without the converters)."""
    family = hf_config.model_type
    if family not in _BUILTIN_FAMILIES:
        raise ConfigError(f"model.family={family!r} needs megagsm.models.provider (the HF converters); "
                          f"without it only {', '.join(_BUILTIN_FAMILIES)} can be built")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    recompute_fields = _recompute_fields(recompute)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device.type == "cpu",
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **recompute_fields,
        **parallel_fields(parallel),
    )


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def architecture_from_hf(hf_config) -> GPTArchitecture:
    return GPTArchitecture(
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=_rope_theta(hf_config),
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
    )


def _recompute_fields(recompute: str) -> dict:
    if recompute == "none":
        return {}
    fields = dict(recompute_granularity=recompute)
    if recompute == "full":
        fields.update(recompute_method="uniform", recompute_num_layers=1)
    return fields


def build_model(model: ModelConfig, parallel: ParallelConfig, device: torch.device,
                work_dir: str | None = None) -> BuiltModel:
    """This rank's chunks (runtime already initialised), random or pretrained as model.init says.
    With model.init=hf the HF weights are converted once to a megatron checkpoint in
    `<work_dir>/hf_init_mcore` (reused by later runs and resumes), then loaded. model.load (a megatron
    checkpoint) is applied by the caller through megagsm.sft.checkpoint."""
    dtype = resolve_dtype(model, device)
    provider = _provider()
    if provider is None:
        return _build_builtin(model, parallel, device, dtype)
    hf_config = hf_config_for(model).to_dict() if model.init == "random" else provider.load_hf_config(model.hf_dir)
    overrides = _recompute_fields(model.recompute)
    if provider.provider_for(hf_config).family.is_moe:
        try:
            overrides.update(model.moe.overrides())
        except ValueError as e:  # MoEConfig names its fields (model.moe.*)
            raise ConfigError(str(e)) from None
    chunks = provider.build_model_from_hf_config(hf_config, parallel, dtype, **overrides)
    if model.init == "hf":
        converted = _converted_hf_weights(model.hf_dir, parallel, work_dir)
        provider.load_mcore_checkpoint(chunks, converted)
    return BuiltModel(chunks, hf_config, hf_config["model_type"], dtype, model.init == "hf" or model.load is not None)


def _converted_hf_weights(hf_dir: str, parallel: ParallelConfig, work_dir: str | None) -> str:
    """Collective: HF safetensors -> megatron torch_dist (layout-free), once per work_dir."""
    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore  # branch `convert`
    from megagsm.models.hf_config import MANIFEST

    if work_dir is None:
        raise ValueError("model.init=hf needs a work_dir for the converted weights")
    target = os.path.join(work_dir, "hf_init_mcore")
    if not os.path.isfile(os.path.join(target, MANIFEST)):  # written last, inside the atomic dir
        convert_hf_to_mcore(hf_dir, target, parallel, overwrite=True)
    return target


def _build_builtin(model: ModelConfig, parallel: ParallelConfig, device: torch.device,
                   dtype: torch.dtype) -> BuiltModel:
    """Without the converters: random Llama-style models only."""
    if model.init == "hf":
        raise ConfigError("model.init=hf needs megagsm.models.provider (the HF converters), which is "
                          "not installed in this checkout; use model.init=random")
    hf_config = hf_config_for(model)
    if hf_config.vocab_size % parallel.tp:
        # megatron shards the vocabulary evenly over TP ranks (the converters pad it; this path does not)
        raise ConfigError(f"model vocab_size={hf_config.vocab_size} is not divisible by parallel.tp="
                          f"{parallel.tp}; pad the vocabulary (model.vocab_size or config.json)")
    config = transformer_config_from_hf(hf_config, parallel, dtype, device, model.recompute)
    chunks = build_model_chunks(config, architecture_from_hf(hf_config))
    if device.type == "cuda":
        chunks = [c.to(device) for c in chunks]
    return BuiltModel(chunks, hf_config, hf_config.model_type, dtype, model.load is not None)
