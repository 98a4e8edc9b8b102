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
