"""Cache keys *after* RoPE, so a decoding step rotates one position instead of the whole cache.

megatron's static-batching path (`Attention._adjust_key_value_for_inference`) stores un-rotated keys
and re-applies RoPE to every cached key on every step: O(cached positions) extra elementwise work
per layer per token (about 10% of a CPU decoding step at batch 32). For the duration of generate(),
`rope_once(model, cache)` gives each standard attention layer a replacement of that one method
which rotates the new query/key positions with megatron's own `apply_rotary_pos_emb` (same
frequencies, same function as the training forward: rotated values are bit-identical to what the
stock path computes) and writes the rotated keys into the cache. Layers without RoPE on this step,
multi-latent attention and any other context keep megatron's method. The replacement is an instance
attribute, removed on exit, so training never sees it.

Mask types. Generation passes a key-padding mask ([b, 1, 1, keys], True = pad) whenever a row of the
batch is padded. transformer-engine applies `attention_mask` only when the mask type includes
"padding" or is "arbitrary" (with "causal"/"no_mask" it is ignored and shorter prompts would attend to
their pad tokens), so with a mask the prefill runs "padding_causal" (self-attention: TE's
[b, 1, 1, s] padding form) and a decoding step "arbitrary" (one query against every cached key; TE's
padding form would need a (query, key) mask pair for sq != sk, its arbitrary form takes a mask
broadcastable to [b, heads, 1, keys]). Without a mask: "causal" / "no_mask", as before. Every
attention layer gets the mask type this way, RoPE or not (megatron's own method is wrapped).

Per-row decoding (generate_refilled, `cache.row_columns` set): rows hold sequences of different
lengths, each written from column 0, so a decoding step rotates row r's query and key at its own
position row_columns[r] (the same cos/sin values the shared-offset path uses for that position),
writes the key at that column of row r, and attends over columns [0, cache.key_width) with the
key-padding mask hiding each row's columns past its own position. Only the standard attention
layers take this path (`per_row_supported`); multi-latent attention rotates inside its own forward
at the shared offset.
"""
from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.models.common.embeddings.rope_utils import _rotate_half, apply_rotary_pos_emb
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType

try:
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention
except Exception:  # pragma: no cover
    MultiLatentAttention = ()

try:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config as _mscale,
    )
except Exception:  # pragma: no cover
    def _mscale(config):
        return 1.0


def _adjust_key_value_rope_once(self, inference_context, query, key, value, rotary_pos_emb,
                                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                sequence_len_offset=None, *, inference_params=None):
    cache = self._megagsm_rope_cache
    if inference_context is cache and cache.row_columns is not None and not self.training:
        return _per_row_step(self, cache, query, key, value, rotary_pos_emb)
    if (inference_context is not cache or rotary_pos_emb is None or self.config.flash_decode
            or self.training):
        return _adjust_key_value_mask_type(
            self, inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos,
            rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset,
        )
    start = cache.sequence_len_offset
    end = start + key.size(0)
    b = key.size(1)
    q_freqs, k_freqs = rotary_pos_emb
    query = _rotate(self, cache, query, q_freqs, start, end)
    key = _rotate(self, cache, key, k_freqs, start, end)
    keys, values = cache.key_value_memory_dict[self.layer_number]
    rows = slice(cache.batch_size_offset, cache.batch_size_offset + b)  # prefill in row chunks
    keys[start:end, rows] = key
    values[start:end, rows] = value
    return query, keys[:end, rows], values[:end, rows], None, generation_mask_type(cache, start == 0), None


def _per_row_step(attn, cache, query, key, value, rotary_pos_emb):
    """One decoding step (query/key [1, b, heads, d]) with a write column per row (module doc)."""
    cols, rows = cache.row_columns, cache.row_index
    if rotary_pos_emb is not None:
        q_freqs, k_freqs = rotary_pos_emb
        query = _rotate_rows(attn, cache, query, q_freqs, cols)
        key = _rotate_rows(attn, cache, key, k_freqs, cols)
    keys, values = cache.key_value_memory_dict[attn.layer_number]
    keys[cols, rows] = key[0]
    values[cols, rows] = value[0]
    b, width = key.size(1), cache.key_width
    return query, keys[:width, :b], values[:width, :b], None, AttnMaskType.arbitrary, None


def _rotate_rows(attn, cache, t, freqs, cols):
    """`_rotate` of one position per row: the batch axis is laid out as megatron's sequence axis
    ([1, b, h, d] -> [b, 1, h, d] against freqs[cols], [b, 1, 1, d]), so any RoPE variant megatron
    applies (fused, interleaved, partial) rotates each row at its own position."""
    config = attn.config
    mscale = _mscale(config)
    rot_dim = freqs.shape[-1]
    if config.apply_rope_fusion or config.rotary_interleaved or rot_dim != t.shape[-1]:
        out = apply_rotary_pos_emb(t.transpose(0, 1), freqs[cols], config=config, mscale=mscale,
                                   cp_group=attn.pg_collection.cp)
        return out.transpose(0, 1)
    key = (freqs.data_ptr(), "rows", cache.forward_id, t.dtype, mscale)
    if cache.rope_memo_key != key:  # once per forward for all layers
        f = freqs[cols].transpose(0, 1)
        cache.rope_memo = ((torch.cos(f) * mscale).to(t.dtype), (torch.sin(f) * mscale).to(t.dtype))
        cache.rope_memo_key = key
    cos_, sin_ = cache.rope_memo
    return (t * cos_) + (_rotate_half(t, False) * sin_)


def per_row_supported(model) -> bool:
    """Whether every attention layer takes the rope-once path, which can decode per row."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    return (getattr(model, "position_embedding_type", None) == "rope" and not model.config.flash_decode
            and len(rope_layers(model)) == len(attention))


def generation_mask_type(cache, prefill: bool) -> AttnMaskType:
    """The mask type of this step's attention (see the module doc); `cache.key_padding` says whether
    the step passes a key-padding mask (set by generation.forward.StageRunner.forward)."""
    padded = getattr(cache, "key_padding", False)
    if prefill:
        return AttnMaskType.padding_causal if padded else AttnMaskType.causal
    # past the prompt the single new query sees every cached position that is not padding
    return AttnMaskType.arbitrary if padded else AttnMaskType.no_mask


def _adjust_key_value_mask_type(self, inference_context, *args, **kwargs):
    """megatron's own method (layers without the rope-once path), with the generation mask type."""
    out = type(self)._adjust_key_value_for_inference(self, inference_context, *args, **kwargs)
    cache = self._megagsm_rope_cache
    if inference_context is not cache or self.training:
        return out
    prefill = cache.sequence_len_offset == 0
    return (*out[:4], generation_mask_type(cache, prefill), *out[5:])


def _rotate(attn, cache, t, freqs, start, end):
    """megatron's unfused RoPE, `t * cos + rotate_half(t) * sin` (rope_utils._apply_rotary_pos_emb_bshd),
    with cos/sin of the step's positions computed once per step for all layers instead of in every
    call (they are the same values: same function of the same frequencies). Configurations that
    path does not cover (fused/interleaved RoPE, partial rotary dims, MLA) call megatron directly."""
    config = attn.config
    mscale = _mscale(config)
    rot_dim = freqs.shape[-1]
    if config.apply_rope_fusion or config.rotary_interleaved or rot_dim != t.shape[-1]:
        return apply_rotary_pos_emb(t, freqs[start:end], config=config, mscale=mscale,
                                    cp_group=attn.pg_collection.cp)
    key = (freqs.data_ptr(), start, end, t.dtype, mscale)
    if cache.rope_memo_key != key:
        f = freqs[start:end]
        cache.rope_memo = ((torch.cos(f) * mscale).to(t.dtype), (torch.sin(f) * mscale).to(t.dtype))
        cache.rope_memo_key = key
    cos_, sin_ = cache.rope_memo
    return (t * cos_) + (_rotate_half(t, False) * sin_)


def rope_layers(model) -> list[Attention]:
    return [m for m in model.modules()
            if isinstance(m, Attention) and not isinstance(m, MultiLatentAttention)]


@contextlib.contextmanager
def rope_once(model, cache):
    layers = rope_layers(model) if getattr(model, "position_embedding_type", None) == "rope" else []
    others = [m for m in model.modules() if isinstance(m, Attention) and m not in layers]
    for attn in layers:
        attn._megagsm_rope_cache = cache
        attn._adjust_key_value_for_inference = types.MethodType(_adjust_key_value_rope_once, attn)
    for attn in others:
        attn._megagsm_rope_cache = cache
        attn._adjust_key_value_for_inference = types.MethodType(_adjust_key_value_mask_type, attn)
    cache.keys_rotated = bool(layers)
    cache.rope_memo_key, cache.rope_memo = None, None
    cache.forward_id = 0  # per-row decoding memoises cos/sin per forward (generate_refilled counts)
    try:
        yield
    finally:
        for attn in layers + others:
            del attn._adjust_key_value_for_inference
            del attn._megagsm_rope_cache


@torch.no_grad()
def rotate_keys(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys [s, ..., d] rotated by `shift` more positions (RoPE rotations compose: R(a)R(b) =
    R(a+b)); no yarn magnitude scaling, which the keys already carry."""
    freqs = model.rotary_pos_emb(shift + 1)[shift: shift + 1]
    return apply_rotary_pos_emb(keys, freqs, config=model.config, mscale=1.0)
