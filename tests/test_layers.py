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
