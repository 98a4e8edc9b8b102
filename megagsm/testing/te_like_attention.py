"""A CPU stand-in for transformer-engine's DotProductAttention mask handling, for contract tests.

TE documents that `attention_mask` is used only when `attn_mask_type` includes "padding" or is
"arbitrary"; with "causal" or "no_mask" it is ignored. For padding types in self-attention the mask is
one [b, 1, 1, s] tensor (query and key lengths equal); an arbitrary mask is broadcastable to
[b, heads, sq, sk]. `TELikeAttention` is megagsm's SDPA attention with those rules applied first, so a
model built with it (`te_like_spec()`) attends exactly as a TE model would to the masks it is given.
"""
from __future__ import annotations

import contextlib

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megagsm.layers import spec
from megagsm.layers.attention import SDPAttention

MASK_TYPES_TE_APPLIES = (AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)


class TELikeAttention(SDPAttention):
    applies_mask_for_any_mask_type = False  # like TE

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type not in MASK_TYPES_TE_APPLIES:
            attention_mask = None  # what TE does with it
        elif mask_type != AttnMaskType.arbitrary and attention_mask is not None:
            if query.shape[0] != key.shape[0] or attention_mask.shape[-2] != 1:
                raise ValueError(f"{mask_type.name}: TE's self-attention padding mask is one [b, 1, 1, s] "
                                 f"tensor with sq == sk, got mask {tuple(attention_mask.shape)}, "
                                 f"sq {query.shape[0]}, sk {key.shape[0]}")
        return super().forward(query, key, value, attention_mask, attn_mask_type=mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params)


@contextlib.contextmanager
def te_like_spec():
    """Models built inside use TELikeAttention as core attention (the local spec otherwise)."""
    saved = spec._REPLACEMENTS[DotProductAttention]
    spec._REPLACEMENTS[DotProductAttention] = TELikeAttention
    try:
        yield
    finally:
        spec._REPLACEMENTS[DotProductAttention] = saved
