"""Reading an HF config.json, from an HF model dir or a megagsm megatron checkpoint dir (which keeps
the HF side files in its `hf/` subdirectory). No torch/megatron imports: the CLI checks input with it
before loading anything heavy."""
from __future__ import annotations

import json
from pathlib import Path

from megagsm.models.errors import ModelInputError

HF_SUBDIR = "hf"                       # inside a megatron checkpoint dir: HF config + tokenizer files
MANIFEST = "megagsm_checkpoint.json"   # inside a megatron checkpoint dir: what wrote it


def hf_files_dir(path) -> Path:
    """The directory with config.json and tokenizer files: `path` itself for an HF model dir, its
    `hf/` subdirectory for a megatron checkpoint written by megagsm."""
    p = Path(path)
    if not p.is_dir():
        raise ModelInputError(f"{p}: no such directory")
    if (p / HF_SUBDIR / "config.json").is_file():
        return p / HF_SUBDIR
    return p


def load_hf_config(path) -> dict:
    """config.json of an HF model dir or of a megagsm megatron checkpoint dir, as a plain dict."""
    cfg = hf_files_dir(path) / "config.json"
    if not cfg.is_file():
        raise ModelInputError(f"{cfg}: missing (not an HF model directory nor a megagsm checkpoint)")
    try:
        hf = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelInputError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(hf, dict) or "model_type" not in hf:
        raise ModelInputError(f"{cfg}: no 'model_type' field")
    return hf
