"""Core attention on torch's scaled_dot_product_attention, for megatron layer specs without TE.

Replaces megatron's local `DotProductAttention`, which (a) materialises the full score matrix with a
baddbmm + softmax, and (b) does not accept distinct key/value head sizes, which multi-latent attention
(DeepSeek V2/V3) passes as `k_channels`/`v_channels`. SDPA dispatches to fused kernels on CPU and GPU.

Masks follow megatron's convention: a boolean `attention_mask` is True where attention is *forbidden*,
broadcastable to [b, heads, sq, sk]. With a causal mask type the causal mask is aligned to the
bottom-right corner (query i sees keys up to sk - sq + i), which covers a fresh prefill (sq == sk),
KV-cache decoding (sq == 1) and chunked prefill alike.

Packed sequences (THD, `packed_seq_params.qkv_format == "thd"`): q/k/v arrive as [t, heads, dim]
(megatron squeezes the batch of one) with the documents' boundaries in `cu_seqlens_q`. The documents
are grouped by length into a few right-padded [n, heads, L, dim] batches, one causal SDPA call each
(megagsm.layers.thd_buckets; exact: each document attends only to itself); the output is
[t, heads * dv], the layout transformer-engine returns for THD. Measured forward+backward on one
loaded CPU thread (8 heads x 64, fp32), against one SDPA call per document on slices of q/k/v (whose
backward zero-fills a full-size gradient per document): 512 documents of 20-40 tokens 23 s -> 0.36 s;
64 documents of 17-1024 tokens 3.7 s -> 1.05 s, where a loop over `split` views takes 0.82 s (a CPU
call is cheap; on a GPU each call is a kernel launch, and the buckets here are 3 and 15).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megagsm.layers import thd_buckets


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "parallel.cp > 1 needs transformer-engine's attention; megagsm's SDPA attention "
                "supports cp=1 only"
            )
        tp_group = pg_collection.tp if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_group()
        )
        tp_size = tp_group.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.heads_per_partition = config.num_attention_heads // tp_size
        self.groups_per_partition = max(1, config.num_query_groups // tp_size)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.k_channels)
        )
        self.window_size = (
            config.window_size
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
            else None
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by SDPAttention")

    def _mask(self, attention_mask, attn_mask_type, sq, sk, device):
        """Boolean 'may attend' mask for SDPA, or None when SDPA's own is_causal suffices."""
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask.bool()
        causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if causal or self.window_size is not None:
            q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
            k_pos = torch.arange(sk, device=device).unsqueeze(0)
            band = k_pos <= q_pos
            if self.window_size is not None:
                left, right = self.window_size
                if left is not None and left >= 0:
                    band = band & (k_pos >= q_pos - left)
            allowed = band if allowed is None else allowed & band
        return allowed

    def _decode_step(self, query, key, value, attention_mask):
        """One query position (KV-cache decoding): two batched matmuls per KV group instead of SDPA,
        whose fused CPU kernel tiles over query positions and gains nothing with a single one. The
        query heads of a group share one read of its keys/values (no GQA expansion), and a
        batch-major cache (megagsm.generation.kv_cache) makes every [positions, dim] block a plain
        strided matrix, so nothing is copied. Scores and softmax are fp32."""
        _, b, h, dk = query.shape
        sk, _, g, dv = value.shape
        q = query.reshape(b, g, h // g, dk)
        k = key.permute(1, 2, 3, 0)            # [b, g, dk, sk]
        v = value.permute(1, 2, 0, 3)          # [b, g, sk, dv]
        scores = torch.matmul(q, k).float() * self.softmax_scale  # [b, g, h/g, sk]
        if attention_mask is not None:
            forbidden = attention_mask.bool().reshape(attention_mask.shape[0], 1, 1, sk)
            # a row with nothing to attend to (never used) would give NaN: let it see everything
            forbidden = forbidden & ~forbidden.all(dim=-1, keepdim=True)
            scores = scores.masked_fill(forbidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)       # [b, g, h/g, dv]
        return context.reshape(1, b, h * dv)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        attn_mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if packed_seq_params is not None:
            return self._packed(query, key, value, attn_mask_type, packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        if sq == 1 and self.window_size is None and not (self.training and self.dropout_p > 0):
            return self._decode_step(query, key, value, attention_mask)
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        use_is_causal = (
            causal and attention_mask is None and self.window_size is None and sq == sk and sq > 1
        )
        mask = None if use_is_causal or (sq == 1 and attention_mask is None and self.window_size is None) else (
            self._mask(attention_mask, attn_mask_type, sq, sk, query.device)
        )
        if mask is not None:
            # a query row with nothing to attend to (a left-padding position) would give NaN through
            # the softmax; let such rows attend everywhere: their outputs are never used
            mask = mask | ~mask.any(dim=-1, keepdim=True)

        dropout_p = self.dropout_p if self.training else 0.0
        enable_gqa = self.heads_per_partition != k.shape[1]

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=use_is_causal,
                scale=self.softmax_scale,
                enable_gqa=enable_gqa,
            )

        context = self._with_dropout_rng(attend, dropout_p)
        # [b, h, sq, dv] -> [sq, b, h*dv]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads_per_partition * self.v_channels)

    def _with_dropout_rng(self, attend, dropout_p: float):
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()

    def _packed(self, query, key, value, attn_mask_type, packed_seq_params):
        """THD: causal attention inside each document of [t, heads, dim] q/k/v (module docstring)."""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed sequences in qkv_format 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"THD q/k/v must be [t, heads, dim], got {tuple(query.shape)}, {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_q is None or (cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv)):
            raise ValueError("THD self-attention needs cu_seqlens_q, equal to cu_seqlens_kv")
        t = query.shape[0]
        plan = thd_buckets.plan_for(cu_q, t, query.device)
        causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        dropout_p = self.dropout_p if self.training else 0.0
        enable_gqa = self.heads_per_partition != key.shape[1]

        def attend():
            contexts = []
            batches = zip(*(thd_buckets.to_buckets(x, plan) for x in (query, key, value)))
            for bucket, (q, k, v) in zip(plan.buckets, batches):
                L = bucket.length
                # causal: right padding is hidden by the causal mask itself (thd_buckets docstring)
                mask = self._mask(None, attn_mask_type, L, L, query.device) if self.window_size is not None else None
                if not causal and bucket.padding.numel():
                    keys = (torch.arange(L, device=query.device) < bucket.key_lengths[:, None])[:, None, None, :]
                    mask = keys if mask is None else mask & keys
                contexts.append(F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None and L > 1,
                    scale=self.softmax_scale, enable_gqa=enable_gqa))
            return thd_buckets.from_buckets(contexts, plan)

        return self._with_dropout_rng(attend, dropout_p)
