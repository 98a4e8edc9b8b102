"""THD ("packed") model input: several documents concatenated along the sequence of one row, as
megatron's `PackedSeqParams(qkv_format="thd")` describes them to GPTModel.forward.

The documents must cover the whole row (a padding tail is a document of its own): megatron's RoPE
splits the row by the document lengths (per-document positions restarting at 0), and core
attention (transformer-engine's, or megagsm's SDPA) attends causally inside each document only.
`cu_seqlens` are int32 on the model's device (transformer-engine asserts the dtype, its kernels read
them on the GPU); `max_seqlen` is a Python int (the RoPE table length and TE's kernel bound). Importing this module
replaces megatron's unfused THD RoPE by `thd_rope` (the same values in one pass, see there).
"""
from __future__ import annotations

import itertools

import torch
from megatron.core.models.common.embeddings import rope_utils
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


# ---------------------------------------------------------------- RoPE on THD rows, in one pass
_megatron_thd_rope = rope_utils._apply_rotary_pos_emb_thd


def thd_rope(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
             multi_latent_attention: bool = False, mscale: float = 1.0, cp_group=None) -> torch.Tensor:
    """megatron's unfused THD RoPE (`rope_utils._apply_rotary_pos_emb_thd`, same arguments, same
    values bit for bit) without its per-document Python loop: megatron slices the frequency table
    once per document (a host read of cu_seqlens per document) and concatenates, which for the
    hundreds of short sequences of a GSPO microbatch costs more than the rotation itself. Here each
    token's position (its index minus its document's start) gathers its frequencies in one indexing
    op, and one rotation covers the row. `freqs` holding one entry per packed token (megatron's
    offset mode) is used as it is, as megatron's slices would reassemble it. Context parallelism
    keeps megatron's code (its per-rank halves of each document)."""
    if cp_group is None or cp_group.size() > 1:
        return _megatron_thd_rope(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                                  multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
    total = t.shape[0]
    if freqs.shape[0] != total:
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        positions = torch.arange(total, device=freqs.device) - torch.repeat_interleave(
            starts.to(freqs.device), lengths.to(freqs.device), output_size=total)
        freqs = freqs[positions]
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention,
                                                 mscale=mscale).squeeze(1)


# megatron's apply_rotary_pos_emb looks the THD function up in its module at every call
rope_utils._apply_rotary_pos_emb_thd = thd_rope
