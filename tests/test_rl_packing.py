"""GSPO's packed microbatches in one process: the THD row a microbatch is (tokens, labels, per-document
positions, cu_seqlens, the scored positions and their [S, R] view), the token budget and one shape
per mini-batch, the DP placement by tokens, and the loss: packed microbatches give the padded
mini-batch's loss and gradient for every aggregation mode."""
import pytest
import torch

from megagsm.data.packing import first_fit_bins
from megagsm.models.packed_seq import document_prefixes
from megagsm.rl.balance import assign_by_tokens, exchange
from megagsm.rl.batching import LABEL_PAD, Rollouts, build_minibatches, compute_advantages
from megagsm.rl.losses import policy_loss
from megagsm.rl.packing import Sample, build_packed_minibatches, pack_microbatch, token_budget
from megagsm.rl.update import LossSpec, microbatch_loss


def _rollouts(seed=0, prompts=4, n=4, mini_batches=2, flat=(1,), max_response=12):
    g = torch.Generator().manual_seed(seed)
    P, R, LP, K, rewards = [], [], [], [], []
    for p in range(prompts):
        prompt = torch.randint(1, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(0, 2, (n,), generator=g).float()
        r[0], r[1] = 0.0, 1.0
        if p in flat:
            r[:] = 1.0
        for _ in range(n):
            length = int(torch.randint(1, max_response + 1, (1,), generator=g))
            R.append(torch.randint(50, 100, (length,), generator=g).tolist())
            LP.append(-torch.rand(length, generator=g))
            P.append(prompt)
            K.append(p * mini_batches // prompts)
        rewards.append(r)
    return Rollouts(P, R, torch.cat(rewards), K, n, LP)


def test_a_packed_microbatch_is_its_sequences_back_to_back():
    samples = [Sample([1, 2, 3], [7, 8], 0.5, torch.tensor([-0.1, -0.2])),
               Sample([4], [9, 10, 11], -1.0, torch.tensor([-0.3, -0.4, -0.5])),
               Sample([5, 6], [12], 2.0, torch.tensor([-0.6]))]
    b = pack_microbatch(samples, T=16)
    # tokens = seq[:-1], labels = seq[1:], per sequence; then one padding document
    assert b["tokens"][0].tolist() == [1, 2, 3, 7, 4, 9, 10, 5, 6] + [LABEL_PAD] * 7
    assert b["labels"][0].tolist() == [2, 3, 7, 8, 9, 10, 11, 6, 12] + [LABEL_PAD] * 7
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1] + list(range(7))
    params = b["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 4, 7, 9, 16] and params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == 7 and isinstance(params.max_seqlen_q, int)
    # scored: the positions predicting a response token, in packed order
    scored = b["scored"].tolist()
    assert scored == [2, 3, 4, 5, 6, 8]
    assert b["labels"][0, scored].tolist() == b["scored_labels"].tolist() == [7, 8, 9, 10, 11, 12]
    # the [S, R] view: one row per sequence, response token j in column j
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b["response_index"].tolist() == [0, 1, 3, 4, 5, 6]
    assert torch.allclose(b["advantages"], b["response_mask"] * torch.tensor([[0.5], [-1.0], [2.0]]))
    assert torch.allclose(b["gen_log_prob"].flatten()[b["response_index"]],
                          torch.tensor([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]))
    assert "routing" not in b and "token_mask" not in b


def test_a_shared_prompt_is_laid_out_once_and_each_response_continues_it():
    prompt = [1, 2, 3]
    samples = [Sample(prompt, [7, 8, 9], 0.5, group=(0, 0)), Sample(prompt, [10], -0.5, group=(0, 0)),
               Sample(prompt, [11, 12], 1.0, group=(0, 0)), Sample([4, 5], [13, 14], 2.0, group=(0, 1))]
    b = pack_microbatch(samples, T=10, share_prompts=True)
    # the prompt once (its last label is read through `scored` only), then each response's own tokens
    assert b["tokens"][0].tolist() == [1, 2, 3, 7, 8, 11, 4, 5, 13, LABEL_PAD]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 0]
    params = b["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 9, 10]  # (the one-token response has no document)
    assert document_prefixes(params.cu_seqlens_q) == (-1, 0, 0, -1, -1)
    assert params.max_seqlen_q == 5  # RoPE's table reaches the longest continuation (3 + 2 positions)
    # every response token's predecessor, the prompt's last position once per response
    assert b["scored"].tolist() == [2, 3, 4, 2, 2, 5, 7, 8]
    assert b["scored_labels"].tolist() == [7, 8, 9, 10, 11, 12, 13, 14]
    assert b["response_index"].tolist() == [0, 1, 2, 3, 6, 7, 9, 10]
    # the same sequences without sharing cost 3 more prompt tokens per extra response
    plain = pack_microbatch(samples, T=24)
    assert int(plain["packed_seq_params"].cu_seqlens_q[-2]) == 9 + 2 * 3


def test_a_microbatch_filled_exactly_has_no_padding_document():
    samples = [Sample([1, 2], [3, 4], 1.0, group=(0, 0)), Sample([1, 2], [5, 6], -1.0, group=(0, 0))]
    for share, T in ((False, 6), (True, 4)):
        b = pack_microbatch(samples, T=T, share_prompts=share)
        assert int(b["packed_seq_params"].cu_seqlens_q[-1]) == T and (b["tokens"] != LABEL_PAD).all()
        with pytest.raises(ValueError, match=f"{T} tokens do not fit a microbatch of {T - 1}"):
            pack_microbatch(samples, T=T - 1, share_prompts=share)


@pytest.mark.parametrize("lengths,prefix_of,message", [
    ([3, 0], None, "at least one token"), ([3, 2], [-1, 1], "document 1: prefix 1"),
    ([3, 2], [1, -1], "document 0: prefix 1"), ([3, 2, 2], [-1, 0, 1], "document 2: prefix 1"),
    ([3, 2], [-1], "names 1 documents, the row has 2")])
def test_thd_params_refuse_what_no_row_can_be(lengths, prefix_of, message):
    from megagsm.models.packed_seq import thd_params

    with pytest.raises(ValueError, match=message):
        thd_params(lengths, prefix_of=prefix_of)


def test_a_group_cut_by_the_budget_packs_as_parts_each_with_its_prompt():
    from megagsm.rl.packing import prompt_units, shared_tokens

    prompt = [1, 2, 3, 4]
    group = [Sample(prompt, [5, 6, 7], 0.0, group=(0, 0)) for _ in range(4)] + [Sample([9], [8, 8], 0.0, group=(0, 1))]
    units = prompt_units(group, budget=9, share=True)
    # the prompt (4) + 2 tokens per response: three would need 10 tokens
    assert [len(u) for u in units] == [2, 2, 1] and [shared_tokens(u) for u in units] == [8, 8, 2]
    assert [u[0].group for u in units] == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    # packed side by side, the two parts keep their own prompt copies (what the plan counted)
    b = pack_microbatch([s for u in units for s in u], T=20, share_prompts=True)
    assert int(b["packed_seq_params"].cu_seqlens_q[-2]) == 8 + 8 + 2
    assert prompt_units(group, budget=9, share=False) == [[s] for s in group]


def test_shared_prompts_pack_groups_within_the_budget():
    ro = _rollouts(prompts=8, n=4, flat=(2,))
    adv = compute_advantages(ro, filter_zero_std_groups=True)
    plain = build_packed_minibatches(ro, adv, 2, 40, multiple=8)
    shared = build_packed_minibatches(ro, adv, 2, 40, multiple=8, share_prompts=True)
    for a, b in zip(plain, shared):
        assert a.local_sequences == b.local_sequences and a.global_sequences == b.global_sequences
        assert b.real_tokens < a.real_tokens and b.computed_tokens <= a.computed_tokens
        assert all(int(m["packed_seq_params"].cu_seqlens_q[-1]) == b.seq_length <= 40 for m in b.microbatches)
        assert sorted(l for m in b.microbatches for l in m["scored_labels"].tolist()) == sorted(
            l for m in a.microbatches for l in m["scored_labels"].tolist())


def test_a_filler_microbatch_is_one_padding_document_with_nothing_scored():
    b = pack_microbatch([], T=8)
    assert b["packed_seq_params"].cu_seqlens_q.tolist() == [0, 8] and b["scored"].numel() == 0
    assert b["response_mask"].shape == (1, 1) and b["response_mask"].sum() == 0
    assert b["response_index"].numel() == 0


def test_routing_travels_with_its_sequence():
    routing = [torch.full((n, 2, 2), v, dtype=torch.int16) for n, v in ((4, 5), (3, 6))]
    samples = [Sample([1, 2, 3], [7, 8], 0.0, routing=routing[0]), Sample([4], [9, 10, 11], 0.0, routing=routing[1])]
    b = pack_microbatch(samples, T=10, routing_like=routing[0])
    assert b["routing"].shape == (1, 10, 2, 2) and b["routing"].dtype == torch.int16
    assert (b["routing"][0, :4] == 5).all() and (b["routing"][0, 4:7] == 6).all()
    assert b["routing"][0, 7:].tolist() == [[[0, 1]] * 2] * 3  # the padding tail: experts 0..k-1
    assert b["token_mask"][0].tolist() == [True] * 7 + [False] * 3
    with pytest.raises(ValueError, match="routing covers 3 tokens, the sequence feeds 4"):
        pack_microbatch([Sample([1, 2, 3], [7, 8], 0.0, routing=routing[1])], T=8, routing_like=routing[0])


def test_packed_minibatches_hold_every_kept_sequence_within_the_budget_at_one_shape():
    ro = _rollouts(prompts=8, n=4, flat=(2,))
    adv = compute_advantages(ro, filter_zero_std_groups=True)
    budget = 40
    mbs = build_packed_minibatches(ro, adv, 2, budget, multiple=8)
    for k, mb in enumerate(mbs):
        kept = [i for i in range(len(ro)) if ro.mini_batch[i] == k and adv.keep[i]]
        lengths = [len(ro.prompts[i]) + len(ro.responses[i]) - 1 for i in kept]
        assert mb.local_sequences == mb.global_sequences == len(kept)
        assert mb.seq_length % 8 == 0 and mb.seq_length <= 40
        assert len(mb.microbatches) == len(first_fit_bins(lengths, budget, "decreasing")) > 1
        assert mb.real_tokens == sum(lengths) and mb.computed_tokens == mb.seq_length * len(mb.microbatches)
        seen = []
        for b in mb.microbatches:
            assert b["tokens"].shape == (1, mb.seq_length) and mb.micro_batch_size == 1
            assert b["packed_seq_params"].cu_seqlens_q[-1] == mb.seq_length
            assert int((b["tokens"] != LABEL_PAD).sum()) <= budget  # (no real token id is 0 here)
            responses = b["scored_labels"].tolist()
            lens = b["response_mask"].sum(-1).long().tolist()
            for n in lens:
                seen.append(responses[:n])
                responses = responses[n:]
        assert sorted(seen) == sorted(ro.responses[i] for i in kept)


def test_token_budget():
    assert token_budget(None, 4, 100, 156, multiple=8) == 1024       # 4 x 256
    assert token_budget(None, 3, 10, 11, multiple=8) == 64           # 63 rounded up
    assert token_budget(0, 4, 100, 156, 8) == 0 and token_budget(500, 4, 100, 156, 8) == 500


def test_assign_by_tokens_balances_and_moves_only_what_it_must():
    g = torch.Generator().manual_seed(3)
    for ranks in (2, 3, 4):
        for _ in range(20):
            lengths = [torch.randint(1, 60, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(ranks)]
            plan = assign_by_tokens(lengths)
            assert sorted(x for p in plan for x in p) == sorted((r, i) for r, row in enumerate(lengths)
                                                               for i in range(len(row)))
            loads = [sum(lengths[h][i] for h, i in p) for p in plan]
            longest = max((n for row in lengths for n in row), default=0)
            assert max(loads) - min(loads) <= longest, (lengths, plan)
            assert assign_by_tokens(lengths) == plan  # a pure function: every rank computes the same plan
    balanced = [[5, 3], [4, 4]]
    assert assign_by_tokens(balanced) == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    assert assign_by_tokens([[10, 10, 10, 10], []]) == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    assert exchange([["a", "b"]], [[[(0, 1), (0, 0)]]]) == [["b", "a"]]  # one rank: no communication


def _fake_log_probs(table: torch.Tensor, labels: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """A differentiable 'policy': token log-prob = -softplus(table[label, j]) for response token j,
    the same value for a sequence's token whatever microbatch (and view) holds it."""
    return -torch.nn.functional.softplus(table[labels, column])


def _padded_view(batch, table):
    mask = batch["response_mask"]
    column = (mask.cumsum(-1) - 1).clamp(min=0).long()
    return _fake_log_probs(table, batch["labels"], column) * mask


def _packed_view(batch, table):
    S, R = batch["response_mask"].shape
    labels = torch.zeros(S * R, dtype=torch.long)
    labels[batch["response_index"]] = batch["scored_labels"]
    column = torch.arange(R).expand(S, R)
    return _fake_log_probs(table, labels.view(S, R), column) * batch["response_mask"]


@pytest.mark.parametrize("mode,agg", [("gspo", "seq-mean-token-mean"), ("gspo_token", "seq-mean-token-sum-norm"),
                                      ("grpo", "token-mean"), ("gspo", "seq-mean-token-sum")])
@pytest.mark.parametrize("correction", ["none", "tis"])
def test_packed_microbatches_give_the_padded_loss_and_gradient(mode, agg, correction):
    """megatron sums the microbatches' loss sums and divides by the summed counts: packed microbatches
    (any budget) must give policy_loss over the whole padded mini-batch, loss and gradient."""
    ro = _rollouts(seed=1, prompts=4, n=4, mini_batches=1, flat=(2,))
    adv = compute_advantages(ro, filter_zero_std_groups=True)
    spec = LossSpec(mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg, norm=12.0,
                    rollout_correction=correction, rollout_correction_threshold=1.5)
    g = torch.Generator().manual_seed(5)
    # float64: the comparison measures the composition, not fp32 summation order
    base, old_table = (torch.randn(100, 12, generator=g, dtype=torch.float64) for _ in range(2))

    def total(batches, view):
        table = base.clone().requires_grad_(True)
        loss_sum, count = 0.0, 0
        for batch in batches:
            batch = dict(batch, old_log_prob=view(batch, old_table))
            loss, n, _ = microbatch_loss(view(batch, table), batch, spec)
            loss_sum, count = loss_sum + loss, count + int(n)
        (loss_sum / count).backward()
        return (loss_sum / count).item(), table.grad

    (padded,) = build_minibatches(ro, adv, 1, micro_batch_size=len(ro))
    ref_loss, ref_grad = total(padded.microbatches, _padded_view)
    assert ref_grad.abs().sum() > 0
    for budget in (20, 33, 64, 400):
        for share in (False, True):
            (packed,) = build_packed_minibatches(ro, adv, 1, budget, multiple=8, share_prompts=share)
            loss, grad = total(packed.microbatches, _packed_view)
            assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9), (budget, share)
            assert torch.allclose(grad, ref_grad, atol=1e-7), (budget, share)
    # the independent truth for the whole mini-batch: policy_loss on the padded rows
    full = padded.microbatches[0]
    if correction == "none":
        keep = full["response_mask"].sum(-1) > 0
        truth, _ = policy_loss(_padded_view(full, base)[keep], _padded_view(full, old_table)[keep],
                               full["advantages"][keep], full["response_mask"][keep], mode=mode,
                               clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg, norm=12.0)
        assert ref_loss == pytest.approx(truth.item(), rel=1e-6, abs=1e-9)


def test_even_bins_spread_the_tail_and_fall_back_to_first_fit_when_spreading_overflows():
    from megagsm.rl.packing import even_bins

    # first fit decreasing: 100 + 100 + 50 (T = 100, a sixth of the compute is padding); spread: 90/80/80
    bins = even_bins([10] * 25, 3, 100)
    assert sorted(sum(10 for _ in b) for b in bins) == [80, 80, 90]
    assert sorted(i for b in bins for i in b) == list(range(25))
    # longest-first to the emptiest bin would give 3+2+2 = 7 > 6: first fit decreasing's 3+3 | 2+2+2 instead
    lengths = [3, 3, 2, 2, 2]
    bins = even_bins(lengths, 2, 6)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[2, 2, 2], [3, 3]]
    # spreading that fills a bin exactly to the budget is kept (first fit would give 6+3 | 3+3+3)
    assert even_bins([6, 3, 3, 3, 3], 2, 9) == [[0, 3], [1, 2, 4]]
    # more bins than sequences: the spare ones stay empty (filler microbatches)
    assert sorted(map(len, even_bins([5, 4], 3, 10))) == [0, 1, 1]


@pytest.mark.parametrize("interleaved,mla,mscale", [(False, False, 1.0), (True, False, 1.0), (False, True, 0.7)])
def test_thd_rope_is_megatrons_thd_rope_bit_for_bit(interleaved, mla, mscale):
    from megagsm.models.packed_seq import _megatron_thd_rope, thd_rope

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 7, 2]
    cu = torch.tensor([0, 3, 4, 9, 16, 18], dtype=torch.int32)
    t = torch.randn(sum(lengths), 4, 8, generator=g)
    for freqs in (torch.randn(7, 1, 1, 8, generator=g), torch.randn(sum(lengths), 1, 1, 8, generator=g)):
        args = dict(rotary_interleaved=interleaved, multi_latent_attention=mla, mscale=mscale, cp_group=OneRank())
        assert torch.equal(thd_rope(t, cu, freqs, **args), _megatron_thd_rope(t, cu, freqs, **args))


def test_assign_by_tokens_by_hand():
    """Longest first; a sequence stays home while home is under the mean load (ceil), else goes to the
    least-loaded rank (lowest rank on ties); equal lengths are taken in (home, index) order."""
    # target ceil(14 / 2) = 7: 9 -> rank 0 (both empty); 2 stays on 1; each 1 finds rank 0 full -> rank 1
    assert assign_by_tokens([[9, 1, 1, 1], [2]]) == [[(0, 0)], [(0, 1), (0, 2), (0, 3), (1, 0)]]
    # target 8: (0,0) stays, (0,1) goes to the empty rank 1, (1,0) finds 1 full -> rank 0 (tie: lowest)
    assert assign_by_tokens([[5, 5], [5]]) == [[(0, 0), (1, 0)], [(0, 1)]]


def _exchange_on_two_ranks():
    from megagsm.rl.balance import exchange, gather_lengths
    from megagsm.runtime.collectives import group_rank

    import torch.distributed as dist

    dist.init_process_group("gloo")
    me = group_rank()
    cases = {"all_move": [[1], [10]], "mixed": [[9, 1, 1, 1], [2]], "none_move": [[5, 3], [4, 4]]}
    out = {}
    for name, lengths in cases.items():
        local = [[f"{me}:{i}:{n}" for i, n in enumerate(lengths[me])]]
        gathered = gather_lengths([lengths[me]])
        plan = assign_by_tokens(gathered[0])
        out[name] = (gathered[0], plan, exchange(local, [plan]))
    # shared prompts over DP2: rank 0 holds a few long groups, rank 1 one short one; groups move whole
    ro = _rollouts(seed=3, prompts=2, n=4, mini_batches=1, max_response=12)
    if me == 1:
        ro = Rollouts(ro.prompts[:4], [[5]] * 4, ro.rewards[:4], ro.mini_batch[:4], 4, ro.gen_log_probs[:4])
    adv = compute_advantages(ro)
    (mb,) = build_packed_minibatches(ro, adv, 1, 64, multiple=8, dp_group=dist.group.WORLD, share_prompts=True)
    out["shared"] = {"local": mb.local_sequences, "global": mb.global_sequences, "T": mb.seq_length,
                     "micro": len(mb.microbatches), "real": mb.real_tokens,
                     "labels": sorted(tuple(m["scored_labels"].tolist()) for m in mb.microbatches),
                     "prefixed": [m["packed_seq_params"].cu_seqlens_q.megagsm_prefix_of for m in mb.microbatches]}
    dist.destroy_process_group()
    return out


def test_exchange_moves_each_sequence_to_its_placement_on_two_ranks():
    from megagsm.testing.multirank import run_ranks

    ranks = run_ranks(_exchange_on_two_ranks, 2)
    for name, lengths in {"all_move": [[1], [10]], "mixed": [[9, 1, 1, 1], [2]], "none_move": [[5, 3], [4, 4]]}.items():
        plan = assign_by_tokens(lengths)
        for me, result in enumerate(ranks):
            gathered, got_plan, (items,) = result[name]
            assert gathered == lengths and got_plan == plan, name
            assert items == [f"{home}:{i}:{lengths[home][i]}" for home, i in plan[me]], (name, me)
    assert assign_by_tokens([[1], [10]]) == [[(1, 0)], [(0, 0)]]  # every sequence changes rank
    # shared prompts: each rank packs whole groups (its own, or moved to it), both at one shape and count
    shared = [r["shared"] for r in ranks]
    assert shared[0]["global"] == shared[1]["global"] == 12 == sum(r["local"] for r in shared)
    assert shared[0]["T"] == shared[1]["T"] and shared[0]["micro"] == shared[1]["micro"]
    assert all(r["local"] % 4 == 0 and r["local"] > 0 for r in shared)  # groups of 4, none split, none idle
    assert all(any(p >= 0 for p in prefixed) for r in shared for prefixed in r["prefixed"] if prefixed)
