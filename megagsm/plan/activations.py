"""Activation, logit and KV-cache bytes per rank: closed-form estimates (the static part, params.py, is
exact; these are not).

Transformer layers: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", Table 2 (per layer: sbh(34 + 5as/h) with TP+SP, 34sbh/t with selective recompute, 2sbh
with full recompute), with each term written out so it holds for grouped-query attention (K and V
are kv_heads * head_dim wide), a gated MLP (fc1 output 2f wide) and any f: with q = kv = h, f = 4h,
no gate, the terms add up to the paper's 34. Byte sizes are the paper's: activations `act_bytes`
(2 in bf16), dropout masks 1 byte (megagsm builds with dropout 0, so the masks overstate by 2h per
token). MoE layers: the MLP terms once per routed token copy (top-k), all-gathered over expert-TP.
Pipeline: the 1F1B schedule keeps min(pp - stage, microbatches) microbatches in flight on a stage,
times (1 + (pp - 1) / (pp * vpp)) when interleaved (the paper's section 4.2.3 / megatron's
theoretical_memory_usage).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    glu: int                     # 2 for a gated MLP (SwiGLU/GeGLU), else 1
    vocab_padded: int
    moe_ffn: int = 0
    topk: int = 0
    shared_ffn: int = 0

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def _attention_and_norms(shape: Shape, B: int, tp: int, sp: bool) -> float:
    """Bytes per token of one layer outside the MLP, excluding the s^2 core-attention terms."""
    h, q, kv = shape.hidden, shape.q_width, shape.kv_width
    seq_split = tp if sp else 1
    replicated = 2 * B * h + B * h + h          # two norm inputs, QKV input, attention dropout mask
    split = B * (q + kv) + B * kv + B * q       # Q and K for QK^T, V, output-projection input
    return replicated / seq_split + split / tp


def _dense_mlp(shape: Shape, B: int, tp: int, sp: bool, ffn: int) -> float:
    seq_split = tp if sp else 1
    replicated = B * shape.hidden + shape.hidden     # fc1 input, MLP dropout mask
    split = B * shape.glu * ffn + B * ffn            # activation input (fc1 output), fc2 input
    return replicated / seq_split + split / tp


def _moe_mlp(shape: Shape, B: int, tp: int, sp: bool, etp: int) -> float:
    seq_split = tp if sp else 1
    h, fe = shape.hidden, shape.moe_ffn
    router = B * h + h
    # each token's top-k copies, gathered over expert-TP and split by it in the expert FFN
    per_copy = B * h * etp + (B * shape.glu * fe + B * fe)
    out = (router + shape.topk * per_copy) / seq_split
    if shape.shared_ffn:
        out += _dense_mlp(shape, B, tp, sp, shape.shared_ffn) - (B * h + h) / seq_split
    return out


def core_attention_bytes_per_token(shape: Shape, seq: int, B: int, tp: int) -> float:
    """Softmax output, its dropout mask and output: 5as (bf16) per token, kept without recompute."""
    return (2 * B + 1) * shape.heads * seq / tp


def layer_bytes_per_token(shape: Shape, seq: int, B: int, tp: int, sp: bool, etp: int, moe: bool,
                          recompute: str) -> float:
    """One layer's stored activations per token of the micro-batch."""
    full_layer = _attention_and_norms(shape, B, tp, sp) + (
        _moe_mlp(shape, B, tp, sp, etp) if moe else _dense_mlp(shape, B, tp, sp, shape.ffn))
    if recompute == "selective":
        return full_layer
    if recompute == "full":
        return B * shape.hidden / (tp if sp else 1)      # only the layer's input survives
    return full_layer + core_attention_bytes_per_token(shape, seq, B, tp)


def in_flight_microbatches(pp: int, vpp: int | None, stage: int, num_microbatches: int) -> float:
    held = min(pp - stage, num_microbatches)
    if vpp and vpp > 1:
        held *= 1 + (pp - 1) / (pp * vpp)
    return held


def logits_bytes(shape: Shape, tokens: int, B: int, tp: int, loss: str, chunk: int) -> float:
    """Last stage, one micro-batch. plain: logits in the activation dtype, the fp32 copy megatron's
    vocab_parallel_cross_entropy keeps for its backward, and the logit gradient (B bytes).
    chunked (megagsm.sft.fused_ce): one chunk's fp32 logits plus the fp32 output-weight gradient
    accumulator, plus two floats per token."""
    v = shape.vocab_padded / tp
    if loss == "plain":
        return tokens * v * (2 * B + 4)
    return min(chunk, tokens) * v * 4 + v * shape.hidden * 4 + 8 * tokens


def kv_cache_bytes(layers: int, rows: int, positions: int, kv_heads: int, head_dim: int, tp: int, B: int) -> int:
    """layers x rows x (prompt + response) x kv heads per TP rank x head dim x (K and V) x bytes, as
    megagsm.generation.kv_cache.CacheShape counts it."""
    return layers * rows * positions * max(1, kv_heads // tp) * head_dim * 2 * B


def generation_working_bytes(shape: Shape, rows: int, prompt: int, B: int, tp: int, moe: bool) -> float:
    """Prefill of `rows` prompts without autograd: one layer's widest intermediate at a time (the
    layer input and output, fc1's output and the activation) plus the last position's fp32 logits."""
    tokens = rows * prompt
    ffn = shape.glu * shape.ffn + shape.ffn
    if moe:
        ffn = shape.topk * (shape.glu * shape.moe_ffn + shape.moe_ffn)   # top-k copies, over etp
    per_token = B * (2 * shape.hidden + (shape.q_width + 2 * shape.kv_width) / tp + ffn / tp)
    return tokens * per_token + rows * shape.vocab_padded / tp * 4 * 2
