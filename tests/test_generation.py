"""The generation engine: greedy parity with transformers `generate` (dense Qwen2 and Qwen3-MoE, taken
through megagsm's converter), log-probs against a fresh full forward, sampling controls, stopping,
batch compaction, memory errors, train<->generate switching, at one process and at TP2, TP2+SP, PP2,
DP2, and for the MoE at EP2 and TP2xEP2. Refilled generation (generate_refilled: fewer cache rows than
sequences, forced lengths, static decode shapes, routing recording, lockstep) runs in the same launches.

Two launches cover every multi-process case (a launch costs seconds): one single-process rank, one
pair of ranks that rebuilds parallel_state per layout. The rest are in-process unit tests.

Log-prob tolerance (fp32): the engine's log-prob of a token and the full forward's come from the same
weights through differently shaped kernels (one cached position vs the whole sequence, another
reduction order under TP). Measured differences are <= 4e-6 on log-probs of magnitude <= 10 (fp32
roundoff 6e-8 times a few hundred accumulated terms); 2e-5 keeps a 5x margin while a wrong position,
a stale cache row or a mask leak changes log-probs by 1e-2 or more.
"""
import math

import pytest
import torch

from megagsm.generation.engine import _compaction_moves
from megagsm.generation.sampling import Sampler, SamplingParams
from megagsm.generation.stopping import StopChecker
from megagsm.testing import generation_cases as cases
from megagsm.testing.multirank import run_ranks

LP_ATOL = 2e-5
# The tiny Qwen3-MoE's router logits reach |180| (router weights scaled up so that top-k choices
# never hinge on rounding), where fp32 spacing is 1.5e-5; a decoding step's expert GEMMs have other
# shapes than the full forward's, so the renormalised top-2 weights, and the log-probs after them,
# differ by up to 6e-5 (measured). 2e-4 keeps a 3x margin; a wrong expert choice, position or cache
# row moves log-probs by 1e-2 or more.
MOE_LP_ATOL = 2e-4


# ------------------------------------------------------------------ launches (module-scoped)
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    work = tmp_path_factory.mktemp("generation")
    [result] = run_ranks(cases.single_process_cases, 1, str(work))
    return result


@pytest.fixture(scope="module")
def pair(single):
    return run_ranks(cases.two_rank_cases, 2, single["dense_mcore"], single["moe_mcore"],
                     single["moe_eos_id"])


# ------------------------------------------------------------------ one process
@pytest.mark.multirank
@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_matches_transformers(single, side):
    assert single[f"greedy_{side}"] == single["hf"]
    assert single[f"greedy_{side}_chunked"] == single["hf"]
    assert single[f"greedy_{side}_reasons"] == ["length"] * len(single["hf"])
    assert single[f"greedy_{side}_lp_err"] < LP_ATOL


@pytest.mark.multirank
def test_sampling_logprobs_reproducibility_and_n(single):
    assert single["sample_lp_err"] < LP_ATOL
    assert single["sample_same_seed_equal"]
    assert not single["sample_other_seed_equal"]
    assert single["sample_prompt_index"] == [i // 3 for i in range(3 * len(cases.PROMPT_LENGTHS))]
    # 8 samples of one prompt (one shared prefill) are 8 different completions
    assert single["n8_distinct"] == 8
    assert single["n8_lp_err"] < LP_ATOL
    assert single["processed_same_tokens"] and single["processed_le_zero"]
    assert single["processed_differs_from_raw"]


def _cut_after(tokens, stop_id):
    return tokens[: tokens.index(stop_id) + 1] if stop_id in tokens else tokens


@pytest.mark.multirank
def test_eos_stops_rows_and_compaction_keeps_the_others(single):
    stop = single["eos_id"]
    expected = [_cut_after(g, stop) for g in single["greedy_left"]]
    assert single["eos_completions"] == expected
    assert single["eos_reasons"] == ["eos" if stop in g else "length" for g in single["greedy_left"]]
    assert len(single["eos_completions"][0]) == 5  # the stop token is kept
    assert single["eos_lp_err"] < LP_ATOL


@pytest.mark.multirank
def test_stop_strings(single):
    stop = single["stop_string"]
    for full, text, comp, reason, greedy in zip(single["stop_full_texts"], single["stop_texts"],
                                                single["stop_completions"], single["stop_reasons"],
                                                single["greedy_left"]):
        if stop in full:  # one character per token: the cut is exact
            end = full.index(stop) + len(stop)
            assert reason == "stop" and text == full[:end] and comp == greedy[:end]
        else:
            assert reason == "length" and text == full and comp == greedy
    assert single["stop_reasons"][1] == "stop"


@pytest.mark.multirank
def test_kv_cache_too_large_names_the_numbers(single):
    msg = single["too_large"]
    assert msg is not None
    for part in ("batch 6 x 25 positions", "2 layers", "2 KV heads/rank", "4 bytes",
                 f"{2 * 6 * 25 * 2 * 16 * 2 * 4} bytes", "kv_cache_bytes", "1000 B"):
        assert part in msg, (part, msg)


def _forced(greedy, stop, lengths):
    """What response_lengths make of greedy completions: cut after the first stop token, or after
    `length` tokens with the last one replaced by the stop token."""
    return [_cut_after(g, stop) if stop in g[:n] else g[: n - 1] + [stop] for g, n in zip(greedy, lengths)]


@pytest.mark.multirank
def test_refilled_generation_matches_transformers_and_the_static_path(single):
    """generate_refilled with fewer cache rows than sequences: greedy parity, log-probs against a
    fresh forward, forced long-tailed lengths (rows end at different steps and are refilled)."""
    assert single["refill_greedy"] == single["hf"]
    assert single["refill_greedy_lp_err"] < LP_ATOL
    assert single["refill_prompt_index"] == list(range(len(cases.PROMPT_LENGTHS)))
    assert single["refill_nothing_waits"] == [True, False]
    stop = single["eos_id"]
    expected = _forced(single["greedy_left"], stop, cases.FORCED_LENGTHS)
    assert single["refill_forced"] == expected
    assert single["static_forced"] == expected
    assert single["refill_forced_reasons"] == single["static_forced_reasons"] == ["eos"] * len(expected)
    assert len(expected[0]) == 5 < cases.FORCED_LENGTHS[0]  # its own stop token came first
    assert single["refill_forced_lp_err"] < LP_ATOL
    # stop strings: the same texts and reasons as the static path
    assert single["refill_stop_texts"] == single["stop_texts"]
    assert single["refill_stop_reasons"] == single["stop_reasons"]
    msg = single["refill_too_large"]
    assert msg is not None and "batch 2 x 25 positions" in msg and "kv_cache_bytes" in msg


@pytest.mark.multirank
def test_refilled_static_decode_shapes(single):
    """cuda_graphs=True (static shapes; captured only on CUDA): one decode shape, 3 rows x 25 columns,
    the same tokens and log-probs as the eager refilled path (whose shapes vary step to step)."""
    assert single["static_shape_set"] == [((3, 1), (3, 1, 1, 25), (3,))]
    assert single["eager_shape_count"] > 1
    assert single["static_shape_completions"] == single["refill_forced"]
    assert single["static_shape_lp_diff"] < LP_ATOL


@pytest.mark.multirank
def test_refilled_sampling_is_reproducible(single):
    assert single["refill_sample_same_seed_equal"]
    assert single["refill_sample_lp_err"] < LP_ATOL
    assert single["refill_sample_prompt_index"] == [i // 3 for i in range(3 * len(cases.PROMPT_LENGTHS))]


@pytest.mark.multirank
def test_refilled_moe_routing_per_sequence(single):
    """Rows move and refill: each sequence's recorded routing still equals the static path's."""
    assert single["moe_refill_completions"] == single["moe_refill_static_completions"]
    assert single["moe_refill_routing_shapes_ok"]
    assert single["moe_refill_routing_equal"]


@pytest.mark.multirank
def test_train_generate_switch_shares_weights(single):
    assert single["train_mode_restored"]
    # every linear of the 2-layer model (qkv, proj, fc1, fc2 per layer + output layer) took the plain
    # matmul inside generation, none kept it after
    assert single["plain_matmul_linears_inside"] == 9 and single["plain_matmul_linears_after"] == 0
    assert single["no_weight_copy"]
    assert single["grads_untouched"]
    assert single["train_mode_greedy_equal"]
    assert single["train_after_generate"]


@pytest.mark.multirank
def test_cpu_compat_suspension_is_scoped(single):
    assert single["suspended_mode_off"] and single["mode_back"]


@pytest.mark.multirank
def test_moe_greedy_matches_transformers_and_logprobs(single):
    """Qwen3-MoE (8 experts, top-2) through the converter: greedy parity at EP1."""
    assert single["moe_greedy"] == single["moe_hf"]
    assert single["moe_greedy_lp_err"] < MOE_LP_ATOL
    assert single["moe_sample_lp_err"] < MOE_LP_ATOL
    stop = single["moe_eos_id"]
    assert single["moe_eos_completions"] == [_cut_after(g, stop) for g in single["moe_hf"]]


# ------------------------------------------------------------------ two ranks
@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2"])
def test_model_parallel_layouts(single, pair, layout):
    for rank, result in enumerate(pair):
        assert result[f"{layout}_greedy"] == single["hf"], (layout, rank)
        assert result[f"{layout}_greedy_lp_err"] < LP_ATOL
        assert result[f"{layout}_sample_lp_err"] < LP_ATOL
        assert result[f"{layout}_sample_reproducible"]
        assert result[f"{layout}_refill_greedy"] == single["hf"], (layout, rank)
        assert result[f"{layout}_refill_sample_lp_err"] < LP_ATOL
        assert result[f"{layout}_refill_sample_reproducible"]
    assert pair[0][f"{layout}_refill_sample"] == pair[1][f"{layout}_refill_sample"]
    if layout == "tp2_sp":
        assert all(result["tp2_sp_static_shape_greedy"] == single["hf"] for result in pair)
    if layout != "pp2":
        assert all(result[f"{layout}_train_after_generate"] for result in pair)
    # both ranks of the model-parallel group return the same (broadcast) samples
    assert pair[0][f"{layout}_sample"] == pair[1][f"{layout}_sample"]


@pytest.mark.multirank
def test_kv_cache_too_large_on_one_rank_stops_the_group(pair):
    assert "batch 6 x 25 positions" in pair[0]["tp2_too_large"]
    assert pair[1]["tp2_too_large"].startswith("on rank 0: the KV cache")
    # refilled: rank 1's budget fails this time
    assert "batch 2 x 25 positions" in pair[1]["tp2_refill_too_large"]
    assert pair[0]["tp2_refill_too_large"].startswith("on rank 1: the KV cache")


@pytest.mark.multirank
def test_data_parallel_ranks_generate_their_own_prompts(single, pair):
    for rank, result in enumerate(pair):
        assert result["dp2_greedy"] == single["hf"][rank::2]
        assert result["dp2_refill_greedy"] == single["hf"][rank::2]
        assert result["dp2_greedy_lp_err"] < LP_ATOL
        assert result["dp2_sample_lp_err"] < LP_ATOL


@pytest.mark.multirank
def test_expert_parallel_lockstep(single, pair):
    stop = single["moe_eos_id"]
    expected = [_cut_after(g, stop) for g in single["moe_hf"]]
    # EP2: the two ranks are two data-parallel replicas with their own prompts (3 and 1)
    assert pair[0]["ep2_greedy"] + pair[1]["ep2_greedy"] == single["moe_hf"]
    assert pair[0]["ep2_eos_completions"] + pair[1]["ep2_eos_completions"] == expected
    # TP2 x EP2 (experts split over the TP ranks, etp=1): one replica, all prompts on both ranks
    for result in pair:
        assert result["tp2ep2_greedy"] == single["moe_hf"]
        assert result["tp2ep2_eos_completions"] == expected
    for result in pair:
        for name in ("ep2", "tp2ep2"):
            assert result[f"{name}_eos_lp_err"] < MOE_LP_ATOL, name
            assert result[f"{name}_sample_lp_err"] < MOE_LP_ATOL, name
            assert result[f"{name}_train_after_generate"], name
    assert pair[0]["ep2_empty_rank_lengths"] == [4, 4, 4]
    assert pair[1]["ep2_empty_rank_lengths"] == []
    assert pair[0]["ep2_refill_empty_rank_lengths"] == [4, 4, 4]
    assert pair[1]["ep2_refill_empty_rank_lengths"] == []
    # refilled in lockstep (one cache row per rank: rank 0 refills twice while rank 1 waits)
    assert pair[0]["ep2_refill_eos_completions"] + pair[1]["ep2_refill_eos_completions"] == expected
    for result in pair:
        assert result["tp2ep2_refill_eos_completions"] == expected
    for result in pair:  # batched into groups of 2 prompts / chunked prefill: same completions
        assert result["ep2_batched_completions"] == result["ep2_eos_completions"]
        assert result["ep2_batched_prompt_index"] == list(range(len(result["ep2_eos_completions"])))
        assert result["ep2_chunked_completions"] == result["ep2_eos_completions"]


# ------------------------------------------------------------------ in-process units
def test_sampling_params_validation_names_fields():
    with pytest.raises(ValueError, match="top_p=1.5") as err:
        SamplingParams(top_p=1.5, n=0, logprobs="all")
    assert "n=0" in str(err.value) and "logprobs='all'" in str(err.value)
    with pytest.raises(ValueError, match="list of strings"):
        SamplingParams(stop_strings="</s>")
    assert SamplingParams(temperature=0.0).is_greedy


def _logits(b=4, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_sampler_greedy_and_degenerate_filters_agree():
    logits = _logits()
    greedy, lp = Sampler(SamplingParams(greedy=True), torch.device("cpu"))(logits)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(-1, greedy[:, None]).squeeze(-1))
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        tokens, _ = Sampler(params, torch.device("cpu"))(logits)
        assert torch.equal(tokens, greedy)


def test_sampler_vocab_limit_excludes_padded_rows():
    logits = _logits()
    logits[:, 45:] = 100.0  # padded embedding rows must never be drawn
    tokens, _ = Sampler(SamplingParams(greedy=True), torch.device("cpu"), vocab_limit=45)(logits)
    assert (tokens < 45).all()


def _empirical(params, logits, draws=4000):
    sampler = Sampler(params, torch.device("cpu"))
    tokens, _ = sampler(logits.expand(draws, -1))
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_sampler_distributions():
    """Frequencies over 4000 independent draws match the intended distribution (4 sigma)."""
    logits = _logits(b=1, v=12, seed=3)[0]
    for params, keep in (
        (SamplingParams(temperature=0.7, seed=1), None),
        (SamplingParams(temperature=1.0, top_k=3, seed=2), "top_k"),
        (SamplingParams(temperature=1.0, top_p=0.6, seed=3), "top_p"),
    ):
        target = torch.softmax(logits / params.temperature, -1)
        if keep == "top_k":
            cut = target.topk(3).values[-1]
            target = torch.where(target >= cut, target, 0.0)
        elif keep == "top_p":
            order = target.argsort(descending=True)
            before = target[order].cumsum(0) - target[order]
            dropped = order[before >= 0.6]
            target = target.clone()
            target[dropped] = 0.0
        target = target / target.sum()
        freq = _empirical(params, logits[None])
        sigma = (target * (1 - target) / 4000).sqrt()
        assert ((freq - target).abs() <= 4 * sigma + 1e-9).all(), (params, freq, target)
        assert (freq[target == 0] == 0).all()


def test_inverse_cdf_draw_at_the_extremes_of_the_uniform(monkeypatch):
    """u = 0 and u -> 1 (the largest float below 1): the draw lands on the first and the last entry of
    positive probability, never on the zero-probability entries around them; frequencies follow probs."""
    from megagsm.generation.sampling import inverse_cdf_draw

    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 2)

    for u, expected in ((0.0, 1), (1.0 - 2.0 ** -24, 3)):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u, dtype=kw.get("dtype", torch.float32)))
            assert inverse_cdf_draw(probs, torch.Generator()).flatten().tolist() == [expected, expected]
    draws = inverse_cdf_draw(probs[:1].expand(20000, 5), torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[[0, 2, 4]].sum() == 0 and abs(freq[1].item() - 0.25) < 0.02


def test_sampler_forced_tokens_and_their_logprobs():
    """response_lengths forces a token: emitted where force >= 0, with the raw (greedy, "raw") or tempered
    log-prob of that token; the other rows keep what the unforced draw gives (the generator advances alike)."""
    logits = _logits(b=4, v=12, seed=6)
    force = torch.tensor([-1, 3, -1, 0])
    for params, scale in ((SamplingParams(greedy=True), 1.0), (SamplingParams(temperature=0.5, seed=2), 1.0),
                          (SamplingParams(temperature=0.5, top_k=3, logprobs="tempered", seed=2), 0.5)):
        free, free_lp = Sampler(params, torch.device("cpu"))(logits)
        tokens, lp = Sampler(params, torch.device("cpu"))(logits, force)
        assert tokens.tolist() == [free[0], 3, free[2], 0]
        expected = torch.log_softmax(logits / scale, -1)
        assert torch.allclose(lp[[1, 3]], expected[[1, 3], [3, 0]])
        assert torch.equal(lp[[0, 2]], free_lp[[0, 2]])


def test_processed_logprobs_are_the_sampling_distribution():
    logits = _logits(b=1, v=12, seed=4)
    params = SamplingParams(temperature=0.5, top_k=4, logprobs="processed", seed=0)
    tokens, lp = Sampler(params, torch.device("cpu"))(logits.expand(64, -1))
    scaled = logits[0] / 0.5
    top = scaled.topk(4)
    expected = torch.log_softmax(top.values, -1)
    for t, l in zip(tokens.tolist(), lp.tolist()):
        assert math.isclose(l, expected[top.indices.tolist().index(t)].item(), abs_tol=1e-6)


def test_tempered_logprobs_are_what_the_trainer_recomputes():
    """logprobs="tempered": log_softmax(logits / T)[token] over the whole vocabulary, top-k/top-p or not
    (the GSPO trainer's log-probs, so the sampler-vs-trainer diagnostic compares like with like)."""
    logits = _logits(b=1, v=12, seed=5)
    expected = torch.log_softmax(logits[0] / 0.7, -1)
    for extra in ({}, {"top_k": 3}, {"top_p": 0.5}):
        params = SamplingParams(temperature=0.7, logprobs="tempered", seed=1, **extra)
        tokens, lp = Sampler(params, torch.device("cpu"))(logits.expand(32, -1))
        for t, l in zip(tokens.tolist(), lp.tolist()):
            assert math.isclose(l, expected[t].item(), abs_tol=1e-6), extra


def test_compaction_moves_fill_holes_from_the_tail():
    finished = torch.tensor([True, False, True, False, False, True, False])
    holes, movers = _compaction_moves(finished)
    assert holes.tolist() == [0, 2] and movers.tolist() == [4, 6]
    rows = torch.arange(7)
    rows[holes] = rows[movers]
    assert sorted(rows[:4].tolist()) == [1, 3, 4, 6]


class _CharTok:
    def batch_decode(self, ids, skip_special_tokens=False):
        return ["".join(chr(97 + i) for i in seq) for seq in ids]


def test_stop_checker_tail_and_truncation():
    checker = StopChecker([7], ["cde", "zz"], _CharTok(), torch.device("cpu"))
    assert checker.eos_hits(torch.tensor([1, 7, 3])).tolist() == [False, True, False]
    completions = torch.tensor([[0, 1, 2, 3, 4], [2, 3, 0, 0, 0]])
    assert checker.string_hits(completions, [0, 1], 5) == [0]
    assert checker.string_hits(completions, [0, 1], 4) == []  # "abcd": not yet
    assert checker.truncate_text("xxcdeyy") == "xxcde"
    with pytest.raises(ValueError, match="tokenizer"):
        StopChecker([], ["x"], None, torch.device("cpu"))


def test_decode_attention_step_matches_reference():
    """SDPAttention's one-query path (KV-cache decoding) on a batch-major cache view, with a
    left-padding mask, against plain softmax attention."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megagsm.layers.attention import SDPAttention

    class _TP1:
        def size(self):
            return 1

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, kv_channels=8, attention_dropout=0.0)
    attn = SDPAttention(config, 1, AttnMaskType.causal, pg_collection=SimpleNamespace(tp=_TP1()))
    g = torch.Generator().manual_seed(0)
    b, sk = 3, 7
    cache_k = torch.randn(5, 2, 10, 8, generator=g).permute(2, 0, 1, 3)  # [S, B, g, d] view
    cache_v = torch.randn(5, 2, 10, 8, generator=g).permute(2, 0, 1, 3)
    k, v = cache_k[:sk, :b], cache_v[:sk, :b]
    q = torch.randn(1, b, 4, 8, generator=g)
    pad = torch.tensor([0, 2, 6])  # left padding per row
    mask = (torch.arange(sk)[None] < pad[:, None]).view(b, 1, 1, sk)
    got = attn(q, k, v, mask, attn_mask_type=AttnMaskType.no_mask)
    kk = k.repeat_interleave(2, dim=2)
    vv = v.repeat_interleave(2, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(mask, float("-inf"))
    ref = torch.einsum("bhqk,kbhd->qbhd", torch.softmax(scores, -1), vv).reshape(1, b, 32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_sampling_params_from_generation_config():
    from megagsm.config.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=7, temperature=0.0, top_k=5, top_p=0.9, n_samples=4,
                           seed=3, stop=["</answer>"])
    p = SamplingParams.from_config(cfg, stop_token_ids=[2])
    assert p.is_greedy and p.max_new_tokens == 7 and p.n == 4 and p.seed == 3
    assert p.top_k == 5 and p.top_p == 0.9
    assert p.stop_token_ids == (2,) and p.stop_strings == ("</answer>",)
