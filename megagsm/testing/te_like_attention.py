"""A CPU stand-in for transformer-engine's DotProductAttention mask handling, for contract tests.

TE documents that `attention_mask` is used only when `attn_mask_type` includes "padding" or is
"arbitrary"; with "causal" or "no_mask" it is ignored. For padding types in self-attention the mask is
one [b, 1, 1, s] tensor (query and key lengths equal); an arbitrary mask is broadcastable to
[b, heads, sq, sk]. `TELikeAttention` is megagsm's SDPA attention with those rules applied first, so a
model built with it (`te_like_spec()`) attends exactly as a TE model would to the masks it is given.

Packed sequences (THD) are held to what TE's DotProductAttention asserts and megatron's
TEDotProductAttention does before calling it: the causal mask type becomes padding_causal (TE takes
only padding types for thd), q/k/v are 3-D, cu_seqlens_q/kv are both given, 1-D of one shape, int32
and (TE's kernels read them there) on the q/k/v device; max_seqlen_q/kv are Python ints no smaller
than the longest document (TE sizes its kernels by them), and the attention_mask is not used.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megagsm.layers import spec
from megagsm.layers.attention import SDPAttention

MASK_TYPES_TE_APPLIES = (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)


class TELikeAttention(SDPAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None:
            check_thd_like_te(query, key, value, packed_seq_params)
            mask_type = {AttnMaskType.causal: AttnMaskType.padding_causal,
                         AttnMaskType.no_mask: AttnMaskType.padding}.get(mask_type, mask_type)
            attention_mask = None  # TE takes the documents from cu_seqlens
        elif mask_type not in MASK_TYPES_TE_APPLIES:
            attention_mask = None  # what TE does with it
        elif mask_type != AttnMaskType.arbitrary and attention_mask is not None:
            if query.shape[0] != key.shape[0] or attention_mask.shape[-2] != 1:
                raise ValueError(f"{mask_type.name}: TE's self-attention padding mask is one [b, 1, 1, s] "
                                 f"tensor with sq == sk, got mask {tuple(attention_mask.shape)}, "
                                 f"sq {query.shape[0]}, sk {key.shape[0]}")
        return super().forward(query, key, value, attention_mask, attn_mask_type=mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)


def check_thd_like_te(query, key, value, params) -> None:
    """Raise where TE's DotProductAttention would refuse this THD input (module docstring)."""
    if params.qkv_format != "thd":
        raise ValueError(f"TE packed sequences: qkv_format must be 'thd', got {params.qkv_format!r}")
    if not all(x.dim() == 3 for x in (query, key, value)):
        raise ValueError("TE: Queries, keys and values must be 3D tensors when qkv_format = thd")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_q is None or cu_kv is None:
        raise ValueError("TE: cu_seqlens_q and cu_seqlens_kv can not be None when qkv_format = thd")
    if cu_q.shape != cu_kv.shape or cu_q.dim() != 1:
        raise ValueError("TE: cu_seqlens_q and cu_seqlens_kv must both have shape [batch_size + 1]")
    if cu_q.dtype != torch.int32 or cu_kv.dtype != torch.int32:
        raise ValueError(f"TE: cu_seqlens must both be torch.int32, got {cu_q.dtype}, {cu_kv.dtype}")
    if cu_q.device != query.device or cu_kv.device != query.device:
        raise ValueError(f"TE: cu_seqlens on {cu_q.device}, q/k/v on {query.device}")
    longest = int((cu_q[1:] - cu_q[:-1]).max()) if cu_q.numel() > 1 else 0
    for name in ("max_seqlen_q", "max_seqlen_kv"):
        value_ = getattr(params, name)
        if not isinstance(value_, int) or value_ < longest:
            raise ValueError(f"TE: {name}={value_!r} must be a Python int >= the longest document ({longest})")
    from megagsm.models.packed_seq import document_prefixes

    if document_prefixes(cu_q) is not None:  # TE attends inside each document: a continuation would lose its prompt
        raise ValueError("TE: documents continuing a shared prefix (train.share_prompts) are SDPA-only")


@contextlib.contextmanager
def te_like_spec():
    """Models built inside use TELikeAttention as core attention (the local spec otherwise)."""
    saved = spec._REPLACEMENTS[DotProductAttention]
    spec._REPLACEMENTS[DotProductAttention] = TELikeAttention
    try:
        yield
    finally:
        spec._REPLACEMENTS[DotProductAttention] = saved
