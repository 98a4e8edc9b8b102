"""The table of model families, keyed by HF config.json `model_type`.

Adding a family: write megagsm/models/families/<name>.py exposing `FAMILY`, add one row here.
Modules are imported on first use, so listing the known types costs nothing."""
from __future__ import annotations

import importlib

from megagsm.models.errors import ModelInputError

FAMILIES: dict[str, str] = {
    "qwen2": "megagsm.models.families.qwen2",        # Qwen2, Qwen2.5
    "qwen3": "megagsm.models.families.qwen3",
    "llama": "megagsm.models.families.llama",        # Llama, deepseek-llm, deepseek-coder
    "gemma": "megagsm.models.families.gemma",        # Gemma v1
    "seed_oss": "megagsm.models.families.seed_oss",  # Seed-OSS
    "qwen3_moe": "megagsm.models.families.qwen3_moe",  # Qwen3-30B-A3B, Qwen3-235B-A22B
    "qwen2_moe": "megagsm.models.families.qwen2_moe",  # Qwen1.5-MoE, Qwen2-57B-A14B
    "deepseek_v3": "megagsm.models.families.deepseek_v3",  # DeepSeek-V3/R1 (MLA + MoE)
    "deepseek_v2": "megagsm.models.families.deepseek_v2",  # DeepSeek-V2, V2-Lite (MLA + MoE)
}


def known_model_types() -> list[str]:
    return sorted(FAMILIES)


def check_model_type(model_type) -> str:
    if model_type not in FAMILIES:
        raise ModelInputError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(known: {', '.join(known_model_types())})"
        )
    return model_type


def family_for(model_type):
    """The Family record for an HF model_type."""
    return importlib.import_module(FAMILIES[check_model_type(model_type)]).FAMILY
