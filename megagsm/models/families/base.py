"""What a model family module provides, as one record (`Family`), plus small config-reading helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megagsm.models.errors import ModelInputError
from megagsm.models.gpt import GPTArchitecture
from megagsm.models.mapping import WeightMap


@dataclass
class ModelSettings:
    """An HF config, translated: TransformerConfig kwargs for the model's shape (the provider adds
    parallel layout and dtype) and GPTModel arguments (vocab_size unpadded, as in the HF config)."""

    config: dict[str, Any]
    arch: GPTArchitecture


@dataclass(frozen=True)
class Family:
    model_type: str                                   # HF config.json "model_type"
    settings: Callable[[dict], ModelSettings]         # HF config -> ModelSettings
    weights: Callable[[dict], WeightMap]              # HF config -> weight mapping
    post_build: Callable[[Any, dict], None] | None = None   # (GPTModel, HF config): forward tweaks
    # (TransformerConfig, use_transformer_engine=None, vp_stage=None) -> block spec, like
    # megagsm.layers.spec.decoder_block_spec (the default)
    layer_spec_fn: Callable | None = None
    is_moe: bool = False
    # (translated TransformerConfig kwargs, ParallelConfig): raises ModelInputError for a layout the
    # family's own fields cannot split (experts over EP, ...), beyond the provider's generic checks
    check_layout: Callable[[dict, Any], None] | None = None


def need(hf: dict, name: str):
    """A required config.json field."""
    if hf.get(name) is None:
        raise ModelInputError(
            f"config.json: field {name!r} is required for model_type {hf.get('model_type')!r}"
        )
    return hf[name]


def present(hf: dict, name: str):
    """A config.json field that must be present although null is a valid value (DeepSeek's
    q_lora_rank: null means no query LoRA, while an absent field means transformers' default)."""
    if name not in hf:
        raise ModelInputError(
            f"config.json: field {name!r} is required for model_type {hf.get('model_type')!r} (null is allowed)"
        )
    return hf[name]


def reject(hf: dict, name: str, supported, why: str = "") -> None:
    """Fail on a config value this family does not implement (never ignore it silently)."""
    value = hf.get(name)
    ok = supported(value) if callable(supported) else value in supported
    if not ok:
        raise ModelInputError(
            f"config.json: {name}={value!r} is not supported for model_type "
            f"{hf.get('model_type')!r}{': ' + why if why else ''}"
        )
