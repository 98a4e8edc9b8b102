"""Logit parity between transformers (the HF dir) and megatron (a converted checkpoint) on one token
batch. Collective: megatron runs on every rank at the given layout, transformers on rank 0."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megagsm.checkpoint.integrity import verify_checkpoint_collective
from megagsm.config.parallel import ParallelConfig
from megagsm.models.errors import ModelInputError
from megagsm.models.forward import forward_logits
from megagsm.checkpoint.model_weights import load_mcore_checkpoint
from megagsm.models.provider import load_hf_config, provider_for
from megagsm.runtime.collectives import broadcast_object

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# default pass/fail bound on max |logit diff|: fp32 parity is ~1e-6 on small models; deep models and
# half precision accumulate more rounding
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.25}


def sample_tokens(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, trust_remote_code=False)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    with torch.no_grad():
        out = model(tokens.to(device)).logits.float().cpu()
    del model
    return out


def verify_logits(hf_dir, mcore_dir, parallel: ParallelConfig, batch: int = 2, seq: int = 32,
                  seed: int = 0, dtype: str = "float32", tolerance: float | None = None) -> dict:
    """Run after init_runtime(parallel). Returns the same report dict on every rank."""
    if dtype not in DTYPES:
        raise ModelInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    hf_config = load_hf_config(hf_dir)
    ckpt_config = load_hf_config(mcore_dir)
    if ckpt_config.get("model_type") != hf_config.get("model_type"):
        raise ModelInputError(f"{mcore_dir}: model_type {ckpt_config.get('model_type')!r} but {hf_dir} "
                              f"has {hf_config.get('model_type')!r}")
    provider = provider_for(ckpt_config)
    provider.check_layout(parallel)
    verify_checkpoint_collective(mcore_dir)  # files whole and unaltered before any is opened
    chunks = provider.build(parallel, DTYPES[dtype], perform_initialization=False)
    load_mcore_checkpoint(chunks, mcore_dir)
    tokens = sample_tokens(provider.vocab_size, batch, seq, seed)
    ours = forward_logits(chunks, tokens, provider.vocab_size).cpu()
    report = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        ref = hf_logits(hf_dir, tokens, DTYPES[dtype])
        diff = (ours - ref).abs()
        bound = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
        max_diff = diff.max().item()
        report = {
            "model_type": provider.model_type,
            "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": diff.mean().item(),
            "argmax_match": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "tolerance": bound,
            "ok": bool(max_diff <= bound),
            "tokens": [batch, seq],
            "dtype": dtype,
            "layout": {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep},
        }
    if dist.is_initialized() and dist.get_world_size() > 1:
        report = broadcast_object(report, src=0)
    return report
