"""GSPO rollout plumbing in one process: prompt schedule, placement over DP ranks and mini-batches,
[B, T] batching with response masks and log-prob alignment, advantages and group filtering, and the
per-microbatch loss whose sums compose into the global mean under any split."""
import pytest
import torch

from megagsm.config.errors import ConfigError
from megagsm.rl.batching import LABEL_PAD, Rollouts, build_minibatches, compute_advantages, padded_length
from megagsm.rl.losses import policy_loss
from megagsm.rewards import make_batch_scorer
from megagsm.rl.rollout import PromptSchedule, rank_share, rollout_seed
from megagsm.rl.update import LossSpec, MetricSums, microbatch_loss


# ---------------------------------------------------------------- prompt schedule and placement

def test_prompt_schedule_is_a_seeded_permutation_per_epoch():
    s = PromptSchedule(10, 4, seed=3)
    steps = [s.step_indices(i) for i in range(5)]  # 20 positions: two full epochs
    stream = [i for st in steps for i in st]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation each epoch
    assert PromptSchedule(10, 4, seed=3).step_indices(3) == steps[3]  # a pure function of the step
    assert PromptSchedule(10, 4, seed=4).step_indices(0) != steps[0]
    assert s.epoch_of(5) == 2.0


@pytest.mark.parametrize("P,M", [(8, 1), (8, 2), (16, 4), (12, 3)])
def test_rank_share_covers_the_step_and_mini_batches_do_not_depend_on_dp(P, M):
    by_dp = {}
    for dp in (1, 2, 4):
        if P % (M * dp):
            continue
        shares = [rank_share(P, M, dp, r) for r in range(dp)]
        flat = sorted(pos for share in shares for _, pos in share)
        assert flat == list(range(P))  # every prompt exactly once
        members = {k: sorted(pos for share in shares for kk, pos in share if kk == k) for k in range(M)}
        assert members == {k: list(range(k * P // M, (k + 1) * P // M)) for k in range(M)}
        by_dp[dp] = members
    assert len(set(map(str, by_dp.values()))) == 1


def test_rank_share_rejects_uneven_placement():
    with pytest.raises(ConfigError, match="prompts_per_step=6 must be a multiple of mini_batches\\*dp=4"):
        rank_share(6, 2, 2, 0)


def test_rollout_seeds_differ_per_step_and_rank():
    seeds = {rollout_seed(7, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400


def test_scorer_resolves_the_extraction_method():
    from megagsm.config.algorithm import GSPOConfig

    texts = ["so the answer is 12\n#### 12", "the answer is 12"]

    def scorer(reward, method):
        return make_batch_scorer(GSPOConfig(reward=reward, reward_method=method), 16)

    sources = ["openai/gsm8k"] * 2
    assert scorer("gsm8k", "strict").rewards(texts, ["12", "12"], sources) == [1.0, 0.0]
    assert scorer("gsm8k", "flexible").rewards(texts, ["12", "12"], sources) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="reward='nope'"):
        scorer("nope", "strict")


# ---------------------------------------------------------------- batching

def _rollouts(seed=0, prompts=4, n=4, mini_batches=2, zero_std_groups=(1,)):
    g = torch.Generator().manual_seed(seed)
    P, R, LP, K = [], [], [], []
    rewards = []
    for p in range(prompts):
        prompt = torch.randint(1, 50, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        group_rewards = torch.randint(0, 2, (n,), generator=g).float()
        group_rewards[0], group_rewards[1] = 0.0, 1.0  # mixed ...
        if p in zero_std_groups:
            group_rewards[:] = 1.0                      # ... unless it is meant to carry no signal
        for j in range(n):
            length = int(torch.randint(1, 6, (1,), generator=g))
            R.append(torch.randint(50, 100, (length,), generator=g).tolist())
            LP.append(-torch.rand(length, generator=g))
            P.append(prompt)
            K.append(p * mini_batches // prompts)
        rewards.append(group_rewards)
    return Rollouts(P, R, torch.cat(rewards), K, n, LP)


def test_rows_align_log_probs_with_the_tokens_they_score():
    ro = _rollouts()
    adv = compute_advantages(ro)
    mbs = build_minibatches(ro, adv, 2, micro_batch_size=3, multiple=8)
    rows = [(k, b, i) for k, mb in enumerate(mbs) for b, batch in enumerate(mb.microbatches)
            for i in range(batch["tokens"].shape[0])]
    seen = 0
    for k, mb in enumerate(mbs):
        assert mb.seq_length % 8 == 0
        for batch in mb.microbatches:
            assert batch["tokens"].shape == (3, mb.seq_length)  # exactly micro_batch_size rows
            assert torch.equal(batch["position_ids"][0], torch.arange(mb.seq_length))
    for seq in range(len(ro)):
        k = ro.mini_batch[seq]
        local = [s for s in range(len(ro)) if ro.mini_batch[s] == k].index(seq)
        batch = mbs[k].microbatches[local // 3]
        row = local % 3
        prompt, response = ro.prompts[seq], ro.responses[seq]
        L, R = len(prompt), len(response)
        mask = batch["response_mask"][row]
        where = mask.nonzero().flatten().tolist()
        assert where == list(range(L - 1, L - 1 + R))
        # position t predicts labels[t] = seq[t+1] from tokens[:t+1]
        assert batch["labels"][row, where].tolist() == response
        assert batch["tokens"][row, :L].tolist() == prompt
        assert batch["tokens"][row, L: L + R - 1].tolist() == response[:-1]
        assert torch.equal(batch["gen_log_prob"][row, where], ro.gen_log_probs[seq])
        assert torch.allclose(batch["advantages"][row, where], adv.values[seq].expand(R))
        assert (batch["labels"][row, L - 1 + R:] == LABEL_PAD).all()
        seen += 1
    assert seen == len(ro) and len(rows) == sum(len(mb.microbatches) * 3 for mb in mbs)


def test_filler_rows_are_empty_and_counts_are_per_mini_batch():
    ro = _rollouts(prompts=4, n=4, mini_batches=2)
    adv = compute_advantages(ro)
    mbs = build_minibatches(ro, adv, 2, micro_batch_size=3)
    assert [mb.local_sequences for mb in mbs] == [8, 8]
    assert [mb.global_sequences for mb in mbs] == [8, 8]  # no process group: local = global
    assert [len(mb.microbatches) for mb in mbs] == [3, 3]  # ceil(8 / 3)
    last = mbs[0].microbatches[-1]
    assert last["response_mask"][-1].sum() == 0 and last["advantages"][-1].abs().sum() == 0


def test_zero_std_groups_get_zero_advantage_and_are_dropped_when_filtered():
    ro = _rollouts(prompts=4, n=4, zero_std_groups=(1, 2))
    kept = compute_advantages(ro, filter_zero_std_groups=False)
    assert kept.stats["zero_std_groups"] == 2.0 and kept.keep.all()
    assert (kept.values[4:12] == 0).all() and (kept.values[:4] != 0).any()
    filtered = compute_advantages(ro, filter_zero_std_groups=True)
    assert filtered.keep.tolist() == [True] * 4 + [False] * 8 + [True] * 4
    mbs = build_minibatches(ro, filtered, 2, micro_batch_size=2)
    assert [mb.local_sequences for mb in mbs] == [4, 4]
    # a mini-batch made only of filtered groups has nothing to train: no microbatches at all
    all_flat = compute_advantages(_rollouts(prompts=2, n=4, zero_std_groups=(0,)), filter_zero_std_groups=True)
    mbs = build_minibatches(_rollouts(prompts=2, n=4, zero_std_groups=(0,)), all_flat, 2, micro_batch_size=2)
    assert mbs[0].microbatches == [] and mbs[0].global_sequences == 0 and mbs[1].global_sequences == 4


def test_advantages_without_std_division_are_centred_rewards():
    ro = _rollouts(prompts=2, n=4, zero_std_groups=())
    adv = compute_advantages(ro, std_normalize=False)
    expected = ro.rewards.view(2, 4) - ro.rewards.view(2, 4).mean(-1, keepdim=True)
    assert torch.allclose(adv.values, expected.flatten())


def test_padded_length():
    assert padded_length([1, 9, 3], 8) == 16 and padded_length([], 8) == 8 and padded_length([5], 6) == 6


def test_rollouts_validate_shapes():
    with pytest.raises(ValueError, match="whole groups"):
        Rollouts([[1]] * 3, [[2]] * 3, torch.zeros(3), [0] * 3, 2)
    with pytest.raises(ValueError, match="at least one token"):
        Rollouts([[1]] * 2, [[2], []], torch.zeros(2), [0] * 2, 2)


# ---------------------------------------------------------------- loss composition

MODES = [("gspo", "seq-mean-token-mean"), ("gspo_token", "seq-mean-token-sum-norm"),
         ("grpo", "token-mean"), ("gspo", "seq-mean-token-sum")]


@pytest.mark.parametrize("mode,agg", MODES)
def test_microbatch_sums_compose_into_the_global_loss_and_gradient(mode, agg):
    """What megatron does with (loss_sum, count): sum loss_sum over microbatches, divide gradients by
    the summed count. Any split must give policy_loss on the whole mini-batch."""
    ro = _rollouts(seed=1, prompts=4, n=4, mini_batches=1, zero_std_groups=(2,))
    adv = compute_advantages(ro, filter_zero_std_groups=True)
    spec = LossSpec(mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode=agg, norm=8.0)
    g = torch.Generator().manual_seed(5)
    whole = build_minibatches(ro, adv, 1, micro_batch_size=len(ro))[0].microbatches
    assert len(whole) == 1
    T = whole[0]["tokens"].shape[1]
    base = -torch.rand(len(ro), T, generator=g)
    # the same sequences' log-probs by row, old = new + noise so ratios differ from 1 and some clip
    old = base + 0.3 * torch.randn(len(ro), T, generator=g)
    kept = adv.keep.nonzero().flatten()

    def run(micro_batch_size):
        mbs = build_minibatches(ro, adv, 1, micro_batch_size=micro_batch_size)[0]
        params = base.clone().requires_grad_(True)
        total_loss, total_count, start = 0.0, 0, 0
        for batch in mbs.microbatches:
            b = batch["tokens"].shape[0]
            rows = list(range(start, start + b))
            start += b
            # row r holds the r-th kept sequence; filler rows past them read any row (they are masked)
            idx = torch.tensor([int(kept[r]) if r < len(kept) else 0 for r in rows])
            batch["old_log_prob"] = old[idx]
            loss, count, _ = microbatch_loss(params[idx], batch, spec)
            total_loss = total_loss + loss
            total_count += int(count)
        (total_loss / total_count).backward()
        return (total_loss / total_count).item(), params.grad

    ref_params = base.clone().requires_grad_(True)
    full = whole[0]
    ref_loss, _ = policy_loss(ref_params[kept], old[kept], full["advantages"][: len(kept)],
                              full["response_mask"][: len(kept)], mode=mode, clip_ratio_low=0.2,
                              clip_ratio_high=0.28, loss_agg_mode=agg, norm=8.0)
    ref_loss.backward()
    for mbs in (1, 3, 5, 12):
        loss, grad = run(mbs)
        assert loss == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-9), mbs
        assert torch.allclose(grad, ref_params.grad, atol=1e-7), mbs
    assert ref_params.grad.abs().sum() > 0


def test_metric_sums_are_weighted_means():
    sums = MetricSums()
    sums.add("x", torch.tensor(1.0), torch.tensor(3.0))
    sums.add("x", 2.0, 1)
    assert sums.reduce(["x", "absent"]) == {"x": pytest.approx(1.25)}


def test_loss_spec_token_mode():
    assert LossSpec(loss_agg_mode="token-mean").per_token and not LossSpec().per_token


def test_every_split_of_rows_is_whole_sequences():
    ro = _rollouts(prompts=4, n=2, mini_batches=2)
    adv = compute_advantages(ro)
    for mbs in (1, 2, 3):
        for mb in build_minibatches(ro, adv, 2, micro_batch_size=mbs):
            masks = torch.cat([b["response_mask"] for b in mb.microbatches])
            assert int((masks.sum(-1) > 0).sum()) == mb.local_sequences
