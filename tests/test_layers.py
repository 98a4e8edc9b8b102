"""megagsm's norm and SDPA core attention against direct reference formulas and transformers."""
import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.layers.attention import SDPAttention
from megagsm.layers.norm import Norm


def _config(**kw):
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                kv_channels=8, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


class _TP1:
    def size(self):
        return 1


def _attention(config, mask_type=AttnMaskType.causal, **kw):
    return SDPAttention(config, layer_number=1, attn_mask_type=mask_type,
                        pg_collection=SimpleNamespace(tp=_TP1()), **kw)


def _reference(q, k, v, allowed, scale):
    """Plain softmax attention: q [sq,b,h,dk], k [sk,b,g,dk], v [sk,b,g,dv], allowed [b|1,1,sq,sk]."""
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _qkv(sq, sk, b=2, h=4, g=2, dk=8, dv=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, h, dk, generator=gen), torch.randn(sk, b, g, dk, generator=gen),
            torch.randn(sk, b, g, dv, generator=gen))


@pytest.mark.parametrize("sq,sk", [(6, 6), (1, 7), (3, 9)])
def test_causal_attention_is_bottom_right_aligned(sq, sk):
    attn = _attention(_config())
    q, k, v = _qkv(sq, sk)
    qpos = torch.arange(sk - sq, sk).unsqueeze(1)
    allowed = (torch.arange(sk).unsqueeze(0) <= qpos).view(1, 1, sq, sk)
    expected = _reference(q, k, v, allowed, 1 / math.sqrt(8))
    torch.testing.assert_close(attn(q, k, v, None), expected, rtol=1e-5, atol=1e-6)


def test_padding_mask_combined_with_causal():
    attn = _attention(_config())
    q, k, v = _qkv(5, 5)
    forbidden = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    forbidden[0, ..., :2] = True  # sequence 0 is left-padded by two tokens
    out = attn(q, k, v, forbidden)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool)).view(1, 1, 5, 5)
    allowed = causal & ~forbidden
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding rows: anything, never used
    expected = _reference(q, k, v, allowed, 1 / math.sqrt(8))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()


def test_distinct_key_and_value_head_dims_as_in_mla():
    config = _config(num_query_groups=4)
    attn = _attention(config, k_channels=12, v_channels=6, softmax_scale=0.3)
    q, k, v = _qkv(4, 4, g=4, dk=12, dv=6)
    out = attn(q, k, v, None)
    assert out.shape == (4, 2, 4 * 6)
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    torch.testing.assert_close(out, _reference(q, k, v, allowed, 0.3), rtol=1e-5, atol=1e-6)


def test_sliding_window():
    attn = _attention(_config(window_size=(2, 0)))
    q, k, v = _qkv(6, 6)
    i = torch.arange(6)
    allowed = ((i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 2)).view(1, 1, 6, 6)
    torch.testing.assert_close(attn(q, k, v, None), _reference(q, k, v, allowed, 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-6)


def test_context_parallel_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="parallel.cp"):
        _attention(_config(context_parallel_size=2))


def test_rmsnorm_matches_transformers_qwen2_and_gemma():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = torch.randn(3, 5, 32)
    w = torch.randn(32) * 0.1
    ours = Norm(_config(normalization="RMSNorm"), 32, eps=1e-6)
    ref = Qwen2RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(1 + w)
        ref.weight.copy_(1 + w)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)

    gemma = Norm(_config(normalization="RMSNorm", layernorm_zero_centered_gamma=True), 32, eps=1e-6)
    ref = GemmaRMSNorm(32, eps=1e-6)
    assert torch.all(gemma.weight == 0)  # zero-centred: (1 + 0) is the identity scale
    with torch.no_grad():
        gemma.weight.copy_(w)
        ref.weight.copy_(w)
    torch.testing.assert_close(gemma(x), ref(x), rtol=0, atol=1e-6)


def test_zero_centered_layernorm_scales_by_one_plus_weight():
    norm = Norm(_config(normalization="LayerNorm", layernorm_zero_centered_gamma=True), 16, eps=1e-5)
    ref = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.5, 16))
        ref.weight.copy_(1 + torch.linspace(-0.5, 0.5, 16))
        norm.bias.fill_(0.25)
        ref.bias.fill_(0.25)
    x = torch.randn(3, 2, 16)
    torch.testing.assert_close(norm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_layernorm_matches_torch_and_marks_sequence_parallel_params():
    norm = Norm(_config(normalization="LayerNorm", sequence_parallel=True,
                        tensor_model_parallel_size=2), 32, eps=1e-5)
    ref = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        for p in (norm.weight, ref.weight, norm.bias, ref.bias):
            p.copy_(torch.linspace(-1, 1, 32))
    x = torch.randn(5, 4, 32)  # [s, b, h], as in the model: statistics over the last axis only
    torch.testing.assert_close(norm(x), ref(x), rtol=1e-5, atol=1e-5)
    # megatron all-reduces these grads over TP only when flagged
    assert norm.weight.sequence_parallel and norm.bias.sequence_parallel


def test_unknown_normalization_names_allowed_values():
    with pytest.raises(ValueError, match="RMSNorm, LayerNorm"):
        Norm(_config(), 32, eps=1e-5, normalization="L2Norm")


# ---------------------------------------------------------------- packed sequences (THD)

def _thd_inputs(lengths, h=4, g=2, dk=8, dv=8, seed=0):
    """[t, heads, dim] q/k/v of documents of these lengths, and each document alone as [s, 1, heads, dim]."""
    from megagsm.models.packed_seq import thd_params

    t = sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(t, h, dk, generator=gen), torch.randn(t, g, dk, generator=gen), torch.randn(t, g, dv, generator=gen)
    return q, k, v, thd_params(lengths)


@pytest.mark.parametrize("window", [None, (2, 0)])
def test_thd_attention_equals_each_document_alone(window):
    """Per-document causal attention: each document's output is that of the document by itself
    (the reference formula on [s, 1, heads, dim]), in the [t, heads * dv] layout TE returns."""
    lengths = [5, 1, 7, 3]
    attn = _attention(_config(window_size=window) if window else _config())
    q, k, v, params = _thd_inputs(lengths)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(lengths), 4 * 8)
    start = 0
    for n in lengths:
        i = torch.arange(n)
        allowed = i[None, :] <= i[:, None]
        if window:
            allowed &= i[None, :] >= i[:, None] - window[0]
        sl = slice(start, start + n)
        ref = _reference(q[sl, None], k[sl, None], v[sl, None], allowed.view(1, 1, n, n), 1 / math.sqrt(8))
        torch.testing.assert_close(out[sl], ref[:, 0], rtol=1e-5, atol=1e-6)
        start += n


def test_thd_attention_with_mla_head_dims_and_gradients():
    config = _config(num_query_groups=4)
    attn = _attention(config, k_channels=12, v_channels=6, softmax_scale=0.3)
    q, k, v, params = _thd_inputs([3, 4], g=4, dk=12, dv=6)
    q.requires_grad_(True)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (7, 4 * 6)
    out[:3].sum().backward()
    assert q.grad[3:].abs().max() == 0 and q.grad[:3].abs().max() > 0  # documents do not see each other


@pytest.mark.parametrize("window,mask_type,dims", [
    (None, AttnMaskType.causal, (8, 8)), ((3, 0), AttnMaskType.causal, (8, 8)),
    (None, AttnMaskType.no_mask, (8, 8)), (None, AttnMaskType.causal, (12, 6))])
def test_thd_attention_in_length_buckets_equals_each_document_alone_with_gradients(window, mask_type, dims):
    """Documents of very different lengths go through several right-padded SDPA batches: outputs and
    q/k/v gradients (fp64) are those of each document attended by itself (the reference formula)."""
    from megagsm.layers import thd_buckets

    lengths = [1, 130, 7, 64, 65, 3, 300, 31, 31, 90, 2, 129, 33]
    dk, dv = dims
    config = _config(window_size=window) if window else _config()
    attn = _attention(config, mask_type, k_channels=dk, v_channels=dv)
    q, k, v, params = _thd_inputs(lengths, dk=dk, dv=dv)
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    plan = thd_buckets.plan_for(params.cu_seqlens_q, sum(lengths), q.device)
    assert len(plan.buckets) >= 4 and any(b.padding.numel() for b in plan.buckets)
    out = attn(q, k, v, None, packed_seq_params=params)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    parts, start = [], 0
    for n in lengths:
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]) if mask_type == AttnMaskType.causal else torch.ones(n, n, dtype=torch.bool)
        if window:
            allowed &= i[None, :] >= i[:, None] - window[0]
        sl = slice(start, start + n)
        parts.append(_reference(q[sl, None], k[sl, None], v[sl, None], allowed.view(1, 1, n, n),
                                1 / math.sqrt(dk))[:, 0])
        start += n
    expected = torch.cat(parts)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lengths,prefix_of", [
    ([5, 3, 1, 4, 2, 6], [-1, 0, 0, 0, -1, 4]),                      # two prompts, then a lone document
    ([40, 2, 70, 3, 9, 9, 9], [-1, 0, 0, -1, 3, 3, 3]),              # continuations in several buckets
    ([4, 7], [-1, -1]),                                             # nothing shared
    ([4, 3, 2], [-1, -1, 0])])                                      # a continuation after another document
def test_thd_attention_with_shared_prefixes_equals_each_prefix_plus_continuation_alone(lengths, prefix_of):
    """A document continuing a prefix attends as if it followed the prefix in one sequence; the prefix
    attends to itself; q/k/v gradients (fp64) sum over every continuation reading the prefix."""
    from megagsm.models.packed_seq import thd_params

    attn = _attention(_config())
    q, k, v, _ = _thd_inputs(lengths)
    params = thd_params(lengths, prefix_of=prefix_of)
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    out = attn(q, k, v, None, packed_seq_params=params)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    starts = [sum(lengths[:d]) for d in range(len(lengths))]
    span = [torch.arange(a, a + n) for a, n in zip(starts, lengths)]
    expected = [None] * len(lengths)
    for d, p in enumerate(prefix_of):
        rows = span[d] if p < 0 else torch.cat([span[p], span[d]])
        n = len(rows)
        i = torch.arange(n)
        ref = _reference(q[rows, None], k[rows, None], v[rows, None], (i[None, :] <= i[:, None]).view(1, 1, n, n),
                         1 / math.sqrt(8))[:, 0]
        expected[d] = ref if p < 0 else ref[lengths[p]:]
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_shared_prefix_rope_positions_continue_the_prefix():
    """thd_rope rotates a continuation's tokens at the positions after its prefix's."""
    from megatron.core.models.common.embeddings import rope_utils

    from megagsm.models.packed_seq import document_positions, thd_params, thd_rope

    class _CP1:
        def size(self):
            return 1

    lengths, prefix_of = [3, 2, 4, 5], [-1, 0, 0, -1]
    params = thd_params(lengths, prefix_of=prefix_of)
    positions = document_positions(lengths, prefix_of)
    assert positions.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    t = torch.randn(14, 2, 8, generator=torch.Generator().manual_seed(0))
    freqs = torch.randn(params.max_seqlen_q, 1, 1, 8)
    out = thd_rope(t, params.cu_seqlens_q, freqs, cp_group=_CP1())
    want = rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs[positions]).squeeze(1)
    assert params.max_seqlen_q == 7 and torch.equal(out, want)


def test_attention_documents_by_hand():
    """A continued prefix is no document of its own: its first continuation gives its outputs (no
    repeat), later ones read its tokens again; a prefix nothing continues stands alone."""
    from megagsm.layers.thd_buckets import attention_documents

    bounds = [0, 3, 5, 6, 8, 9]
    assert attention_documents(bounds) == [([0, 1, 2], 0), ([3, 4], 0), ([5], 0), ([6, 7], 0), ([8], 0)]
    assert attention_documents(bounds, (-1, 0, 0, -1, 3)) == [
        ([0, 1, 2, 3, 4], 0), ([0, 1, 2, 5], 3), ([6, 7, 8], 0)]
    assert attention_documents(bounds, (-1, -1, 1, 1, -1)) == [([0, 1, 2], 0), ([3, 4, 5], 0), ([3, 4, 6, 7], 2),
                                                               ([8], 0)]


@pytest.mark.parametrize("bounds", [[0], [1, 4], [0, 3, 3, 5], [0, 4, 2]])
def test_thd_plan_refuses_bounds_that_are_not_rising_documents(bounds):
    from megagsm.layers.thd_buckets import build_plan

    with pytest.raises(ValueError, match="must rise from 0"):
        build_plan(bounds, torch.device("cpu"))


def test_thd_buckets_rule_and_plan_cache():
    """Longest first, a new bucket when a document is under 1/ratio of the bucket's longest, all
    documents of at most `floor` tokens together; a plan is rebuilt when cu_seqlens change in place."""
    from megagsm.layers import thd_buckets
    from megagsm.models.packed_seq import thd_params

    assert thd_buckets.bucket_documents([10, 100, 3, 90, 70, 50, 20], ratio=1.5, floor=32) == [
        [1, 3, 4], [5], [0, 2, 6]]
    # exactly 1/ratio of the bucket's longest still joins it
    assert thd_buckets.bucket_documents([60, 40, 39], ratio=1.5, floor=32) == [[0, 1], [2]]
    # a bucket whose longest has `floor` tokens takes every shorter document
    assert thd_buckets.bucket_documents([32, 20, 5], ratio=1.2, floor=32) == [[0, 1, 2]]
    one = thd_buckets.build_plan([0, 5], torch.device("cpu"))
    assert one.identity and [(b.n, b.length) for b in one.buckets] == [(1, 5)]
    params = thd_params([4, 4, 4])
    plan = thd_buckets.plan_for(params.cu_seqlens_q, 12, torch.device("cpu"))
    assert plan.identity and thd_buckets.plan_for(params.cu_seqlens_q, 12, torch.device("cpu")) is plan
    params.cu_seqlens_q[1] = 2  # documents of 2, 6, 4 tokens now
    changed = thd_buckets.plan_for(params.cu_seqlens_q, 12, torch.device("cpu"))
    assert not changed.identity and sorted(b.length for b in changed.buckets) == [6]


def test_thd_attention_refuses_cu_seqlens_that_do_not_cover_the_tokens():
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _attention(_config())
    q, k, v, params = _thd_inputs([3, 4])
    short = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                            cu_seqlens_kv=torch.tensor([0, 3], dtype=torch.int32), max_seqlen_q=3, max_seqlen_kv=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn(q, k, v, None, packed_seq_params=short)
    with pytest.raises(ValueError, match="thd"):
        attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


def _te_like(config):
    from megagsm.testing.te_like_attention import TELikeAttention

    return TELikeAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                           pg_collection=SimpleNamespace(tp=_TP1()))


def test_te_like_attention_takes_valid_thd_as_sdpa_does():
    q, k, v, params = _thd_inputs([5, 2])
    config = _config()
    expected = _attention(config)(q, k, v, None, packed_seq_params=params)
    torch.testing.assert_close(_te_like(config)(q, k, v, None, packed_seq_params=params), expected)


def _variant(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


@pytest.mark.parametrize("problem", ["int64", "no_kv", "shape", "max_seqlen_small", "max_seqlen_tensor",
                                     "four_dims", "format", "device", "shared_prefix"])
def test_te_like_attention_refuses_what_te_refuses(problem):
    q, k, v, params = _thd_inputs([5, 2])
    cu = params.cu_seqlens_q
    if problem == "int64":
        params = _variant(params, cu_seqlens_q=cu.long(), cu_seqlens_kv=cu.long())
    elif problem == "no_kv":
        params = _variant(params, cu_seqlens_kv=None)
    elif problem == "shape":
        params = _variant(params, cu_seqlens_kv=cu[None])
    elif problem == "max_seqlen_small":
        params = _variant(params, max_seqlen_q=4, max_seqlen_kv=4)
    elif problem == "max_seqlen_tensor":
        params = _variant(params, max_seqlen_q=torch.tensor(5), max_seqlen_kv=torch.tensor(5))
    elif problem == "four_dims":
        q, k, v = q[:, None], k[:, None], v[:, None]
    elif problem == "device":  # TE's kernels read cu_seqlens on the q/k/v device
        params = _variant(params, cu_seqlens_q=cu.to("meta"), cu_seqlens_kv=cu.to("meta"))
    elif problem == "shared_prefix":  # TE would attend inside each document only
        from megagsm.models.packed_seq import thd_params

        params = thd_params([5, 2], prefix_of=[-1, 0])
    else:
        params = _variant(params, qkv_format="bshd")
    with pytest.raises(ValueError, match="TE"):
        _te_like(_config())(q, k, v, None, packed_seq_params=params)
