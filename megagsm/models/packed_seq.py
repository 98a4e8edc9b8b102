"""THD ("packed") model input: several documents concatenated along the sequence of one row, as
megatron's `PackedSeqParams(qkv_format="thd")` describes them to GPTModel.forward.

The documents must cover the whole row (a padding tail is a document of its own): megatron's RoPE
splits the row by the document lengths (per-document positions restarting at 0), and core
attention (transformer-engine's, or megagsm's SDPA) attends causally inside each document only.
`cu_seqlens` are int32 on the model's device (transformer-engine asserts the dtype, its kernels read
them on the GPU); `max_seqlen` is a Python int (the RoPE table length and TE's kernel bound).
"""
from __future__ import annotations

import itertools

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def thd_params(lengths: list[int], device: torch.device | str | None = None) -> PackedSeqParams:
    """PackedSeqParams of consecutive documents of these (positive) lengths."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"THD documents need at least one token each, got lengths {lengths}")
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    longest = max(lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def document_positions(lengths: list[int]) -> torch.Tensor:
    """[sum(lengths)] positions restarting at 0 in every document (what RoPE applies under THD; the
    position_ids a learned absolute position embedding would read)."""
    return torch.cat([torch.arange(n) for n in lengths])
