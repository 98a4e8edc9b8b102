"""The decode loop's group behaviour on a random tiny MoE at EP2, one cheap launch (no conversion):
ranks that step together must stop together and keep serving each other's expert exchanges.

* A rank with no prompts at all joins the other's prefill and decode forwards until it is done
  (it returns nothing, the other rank its completions): expert parallelism's lockstep.
* A KV cache that does not fit on one rank stops the whole group: the other rank raises too, naming
  the rank that could not allocate, instead of waiting for it forever.
* Refilled generation in lockstep: a rank that refills its one row more often than the other makes the
  other run dummy prefill forwards; greedy tokens equal the static path's.
* Nothing is decoded after the last token: one prefill and max_new_tokens - 1 decode forwards; when
  every row stops at its first token, both ranks stop after the prefill.
* The refilled path's KV budget holds the cache and the sampler's logits, computed here by hand.
"""
from __future__ import annotations

import pytest

from megagsm.testing.multirank import run_ranks
from megagsm.testing.parity import TinyGPTSpec

# slow: tests/test_generation.py's 2-rank launch checks both in `make test`; this cheaper launch of
# its own is what `make mutate` runs for the decode loop (megagsm/testing/mutation_targets.py)
pytestmark = [pytest.mark.multirank, pytest.mark.slow]

SPEC = TinyGPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=64, vocab_size=128, seq_length=32, num_moe_experts=4)


def _worker(spec):
    import torch.distributed as dist

    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import KVCacheTooLarge, SamplingParams, generate, generate_refilled
    from megagsm.runtime import init_runtime
    from megagsm.testing.parity import tiny_gpt_model

    parallel = ParallelConfig(ep=2, use_distributed_optimizer=False)
    init_runtime(parallel, seed=1, timeout_minutes=1)  # a rank left waiting fails the test within a minute
    model = tiny_gpt_model(spec, parallel)[0].eval()
    rank = dist.get_rank()
    params = SamplingParams(max_new_tokens=5, greedy=True)
    mine = [[3, 4, 5], [6, 7]] if rank == 0 else []
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    r = generate(model, mine, params, vocab_limit=spec.vocab_size)
    hook.remove()
    out = {"lengths": r.lengths.tolist(), "shape": list(r.tokens.shape), "logprobs_shape": list(r.logprobs.shape),
           "forwards": len(forwards)}
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10]] if rank == 0 else [[11, 12]]
    refilled = generate_refilled(model, prompts, params, vocab_limit=spec.vocab_size, max_batch_size=1)
    static = generate(model, prompts, params, vocab_limit=spec.vocab_size)
    out["refilled_equal"] = refilled.tokens.tolist() == static.tokens.tolist()
    out["refilled_lengths"] = refilled.lengths.tolist()
    # every row stops at its first token: after the prefill nobody decodes, and both ranks see that
    first = r.tokens[:, 0].tolist() if rank == 0 else []
    forwards.clear()
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    early = generate(model, mine, SamplingParams(max_new_tokens=5, greedy=True, stop_token_ids=first or [1]),
                     vocab_limit=spec.vocab_size)
    hook.remove()
    out["early_lengths"], out["early_forwards"] = early.lengths.tolist(), len(forwards)
    # the refilled path's budget holds its cache (2 layers x (8 + 8) dims x 2 KV heads x 4 bytes per
    # row and position: 2 rows x (3 + 5) positions) and the sampler's logits (rows x vocab x 4 bytes x 3)
    need = 2 * 16 * 2 * 4 * 2 * 8 + 2 * 128 * 4 * 3
    budgets = {}
    for budget in (need, need - 1):
        try:
            generate_refilled(model, prompts if rank == 0 else [[11, 12]], params, vocab_limit=spec.vocab_size,
                              max_batch_size=2, kv_cache_bytes=budget)
            budgets[budget - need] = "fits"
        except KVCacheTooLarge:
            budgets[budget - need] = "too large"
    out["budgets"] = budgets
    try:  # rank 1's cache may take 1000 bytes: far too few
        generate(model, [[3, 4, 5]], params, vocab_limit=spec.vocab_size,
                 kv_cache_bytes=1000 if rank == 1 else None)
        out["too_large"] = None
    except KVCacheTooLarge as e:
        out["too_large"] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2, SPEC, timeout=300)


def test_a_rank_without_prompts_serves_the_others_until_they_finish(results):
    assert results[0]["lengths"] == [5, 5]
    assert results[1]["lengths"] == []
    # outputs are as wide as the longest completion: 5 tokens, and none at all on the empty rank
    assert results[0]["shape"] == results[0]["logprobs_shape"] == [2, 5]
    assert results[1]["shape"] == results[1]["logprobs_shape"] == [0, 0]


def test_no_forward_after_the_last_token(results):
    # 1 prefill + 4 decode steps for 5 tokens; the empty rank joins each of them
    assert results[0]["forwards"] == results[1]["forwards"] == 5


def test_refilled_lockstep_with_uneven_refills_equals_the_static_path(results):
    assert results[0]["refilled_lengths"] == [5, 5, 5] and results[1]["refilled_lengths"] == [5]
    assert results[0]["refilled_equal"] and results[1]["refilled_equal"]


def test_ranks_that_all_stop_early_stop_decoding_together(results):
    assert results[0]["early_lengths"] == [1, 1] and results[1]["early_lengths"] == []
    assert results[0]["early_forwards"] == results[1]["early_forwards"] == 1  # the prefill only


def test_the_refilled_budget_counts_the_cache_and_the_logits_by_hand(results):
    for result in results:
        assert result["budgets"] == {0: "fits", -1: "too large"}


def test_a_kv_cache_too_large_on_one_rank_stops_both(results):
    assert results[1]["too_large"] is not None and "the KV cache" in results[1]["too_large"]
    assert results[0]["too_large"] is not None and results[0]["too_large"].startswith("on rank 1: the KV cache")
