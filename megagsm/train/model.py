"""This rank's model chunks for a run, from the config's `model` section.

Every model is described by a Hugging Face config (read from `model.hf_dir`, or made from the size
fields with `transformers.AutoConfig.for_model(model.family, ...)`), so checkpoints and the final HF
export always carry the config they follow; the HF config -> megatron mapping is the model family's
(`megagsm.models.provider`), shared with the converters. `model.init=hf` converts the HF weights once
into a layout-free megatron checkpoint under the run's output dir and loads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
from megagsm.checkpoint.model_weights import load_mcore_checkpoint
from megagsm.config.errors import ConfigError
from megagsm.config.model import ModelConfig
from megagsm.config.parallel import ParallelConfig
from megagsm.models import provider
from megagsm.models.hf_config import MANIFEST

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ModelConfig size field -> HF config key (Llama-style names, which every supported family shares)
HF_SIZE_KEYS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim", "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings", "num_experts": "num_experts",
    "moe_router_topk": "num_experts_per_tok", "tie_word_embeddings": "tie_word_embeddings",
}


@dataclass
class BuiltModel:
    chunks: list                 # this rank's GPTModel chunks (one per virtual pipeline stage)
    hf_config: dict              # the HF config the weights follow (for checkpoints and the export)
    dtype: torch.dtype


def resolve_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """model.dtype=auto: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[model.dtype]


def hf_config_for(model: ModelConfig) -> dict:
    """The HF config the model follows: hf_dir's config.json with explicit sizes on top, or one made
    from the sizes and model.family."""
    from transformers import AutoConfig

    overrides = {HF_SIZE_KEYS[k]: v for k, v in model.explicit_sizes().items()}
    if model.hf_dir:
        path = os.path.join(model.hf_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model.hf_dir={model.hf_dir}: no config.json there")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        family = model.family or raw.get("model_type")
        raw.update(overrides)
        raw.pop("model_type", None)
        return AutoConfig.for_model(family, **raw).to_dict()
    if "num_key_value_heads" not in overrides:
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    try:
        return AutoConfig.for_model(model.family, **overrides).to_dict()
    except ValueError as e:
        raise ConfigError(f"model.family={model.family!r}: {e}") from None


def _recompute_fields(recompute: str) -> dict:
    if recompute == "none":
        return {}
    fields = dict(recompute_granularity=recompute)
    if recompute == "full":
        fields.update(recompute_method="uniform", recompute_num_layers=1)
    return fields


def build_model(model: ModelConfig, parallel: ParallelConfig, device: torch.device,
                work_dir: str | None = None) -> BuiltModel:
    """This rank's chunks (runtime already initialised), random or from HF weights as model.init
    says. With model.init=hf the HF weights are converted once to `<work_dir>/hf_init_mcore` (reused
    by later runs and resumes), then loaded. model.load is the trainer's (CheckpointManager)."""
    dtype = resolve_dtype(model, device)
    hf_config = hf_config_for(model) if model.init == "random" else provider.load_hf_config(model.hf_dir)
    overrides = _recompute_fields(model.recompute)
    if provider.provider_for(hf_config).family.is_moe:
        try:
            overrides.update(model.moe.overrides())
        except ValueError as e:  # MoEConfig names its fields (model.moe.*)
            raise ConfigError(str(e)) from None
    chunks = provider.build_model_from_hf_config(hf_config, parallel, dtype,
                                                 attention_backend=model.attention_backend, **overrides)
    if model.init == "hf":
        load_mcore_checkpoint(chunks, _converted_hf_weights(model.hf_dir, parallel, work_dir))
    return BuiltModel(chunks, hf_config, dtype)


def _converted_hf_weights(hf_dir: str, parallel: ParallelConfig, work_dir: str | None) -> str:
    """Collective: HF safetensors -> megatron torch_dist (layout-free), once per work_dir."""
    if work_dir is None:
        raise ValueError("build_model(model.init=hf) needs the run's work_dir for the converted weights")
    target = os.path.join(work_dir, "hf_init_mcore")
    if not os.path.isfile(os.path.join(target, MANIFEST)):  # written last, inside the atomic dir
        convert_hf_to_mcore(hf_dir, target, parallel, overwrite=True)
    return target
