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


def thd_params(lengths: list[int], device: torch.device | str | None = None,
               prefix_of: list[int] | None = None) -> PackedSeqParams:
    """PackedSeqParams of consecutive documents of these (positive) lengths.

    prefix_of: per document, an earlier document it continues (-1: none), e.g. the prompt a GSPO group's
    responses share (megagsm.rl.packing): such a document's positions go on from its prefix's last, and
    its tokens attend to the prefix's as if it followed it. A prefix has no prefix itself. Only megagsm's
    SDPA attention reads this (`document_prefixes`); transformer-engine would attend inside each document."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"THD documents need at least one token each, got lengths {lengths}")
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    offsets = prefix_offsets(lengths, prefix_of)
    longest = max(n + o for n, o in zip(lengths, offsets))
    if prefix_of is not None:
        # megatron hands RoPE only the cu_seqlens tensor, so the structure travels on it (the offsets
        # on the device already: RoPE reads them in every layer, a host copy each time would stall a GPU)
        cu.megagsm_prefix_of = tuple(prefix_of)
        cu.megagsm_prefix_offsets = torch.tensor(offsets, dtype=torch.long, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def document_prefixes(cu_seqlens: torch.Tensor) -> tuple[int, ...] | None:
    """thd_params' prefix_of for these cu_seqlens (None: every document stands alone)."""
    return getattr(cu_seqlens, "megagsm_prefix_of", None)


def prefix_offsets(lengths: list[int], prefix_of: list[int] | None) -> list[int]:
    """Per document, the position its first token has: its prefix's length (0 without one)."""
    if prefix_of is None:
        return [0] * len(lengths)
    if len(prefix_of) != len(lengths):
        raise ValueError(f"prefix_of names {len(prefix_of)} documents, the row has {len(lengths)}")
    for d, p in enumerate(prefix_of):
        if p >= d or (p >= 0 and prefix_of[p] >= 0):
            raise ValueError(f"document {d}: prefix {p} must be an earlier document without a prefix of its own")
    return [lengths[p] if p >= 0 else 0 for p in prefix_of]


def document_positions(lengths: list[int], prefix_of: list[int] | None = None) -> torch.Tensor:
    """[sum(lengths)] positions restarting at 0 in every document, or at its prefix's length (what RoPE
    applies under THD; the position_ids a learned absolute position embedding would read)."""
    offsets = prefix_offsets(lengths, prefix_of)
    return torch.cat([torch.arange(n) + o for n, o in zip(lengths, offsets)])


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
    offset mode) is used as it is, as megatron's slices would reassemble it (not when documents continue
    a prefix: their positions go on from the prefix's length, `thd_params`). Context parallelism
    keeps megatron's code (its per-rank halves of each document)."""
    if cp_group is None or cp_group.size() > 1:
        return _megatron_thd_rope(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                                  multi_latent_attention=multi_latent_attention, mscale=mscale, cp_group=cp_group)
    total = t.shape[0]
    prefixes = document_prefixes(cu_seqlens)
    if freqs.shape[0] != total or prefixes is not None:
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        if prefixes is not None:  # a document continuing a prefix starts at the prefix's length
            starts = starts - cu_seqlens.megagsm_prefix_offsets
        positions = torch.arange(total, device=freqs.device) - torch.repeat_interleave(
            starts.to(freqs.device), lengths.to(freqs.device), output_size=total)
        freqs = freqs[positions]
    return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
                                                 multi_latent_attention=multi_latent_attention,
                                                 mscale=mscale).squeeze(1)


# megatron's apply_rotary_pos_emb looks the THD function up in its module at every call
rope_utils._apply_rotary_pos_emb_thd = thd_rope
