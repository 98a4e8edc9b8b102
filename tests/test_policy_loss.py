"""GSPO / GRPO policy losses, KL penalties and group advantages, against hand-derived values."""

import math
import zlib

import pytest
import torch

from megagsm.rl.losses import (
    LOG_RATIO_CLAMP,
    aggregate_loss,
    broadcast_advantages,
    group_advantages,
    kl_penalty,
    policy_loss,
)

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(autouse=True)
def double_precision():
    """Hand-derived comparisons in float64; the global default is restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _loss_and_grad(log_prob, *args, **kwargs):
    log_prob = log_prob.clone().requires_grad_(True)
    loss, metrics = policy_loss(log_prob, *args, **kwargs)
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


# --------------------------------------------------------------------------- hand-derived cases


def test_grpo_at_ratio_one_by_hand():
    # ratio 1 everywhere: loss per token = -A, d loss_t / d log_prob_t = -A.
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = broadcast_advantages(torch.tensor([1.0, -2.0]), mask).double()
    loss, grad, metrics = _loss_and_grad(old, old, adv, mask, mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2)
    # seq-mean-token-mean: mean(-1 * 3 / 3, 2 * 2 / 2) = mean(-1, 2) = 0.5
    assert loss.item() == pytest.approx(0.5)
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(grad, expected)
    assert metrics["pg_clipfrac"].item() == 0.0 and metrics["ratio_mean"].item() == pytest.approx(1.0)
    # token-mean: (-1 * 3 + 2 * 2) / 5, gradient -A / 5 per token
    loss, grad, _ = _loss_and_grad(old, old, adv, mask, mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2,
                                   loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(0.2)
    torch.testing.assert_close(grad, torch.tensor([[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]))


def test_gspo_by_hand():
    old = torch.zeros(2, 3)
    log_prob = torch.tensor([[0.3, -0.1, 0.1], [0.2, 0.4, 5.0]])  # the 5.0 is masked out
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    s0, s1 = math.exp(0.1), math.exp(0.3)  # exp(mean log-ratio): 0.3/3 and 0.6/2
    kw = dict(mode="gspo", clip_ratio_low=0.2, clip_ratio_high=0.2)

    # A = (+1, +1): s0 = 1.105 inside [0.8, 1.2]; s1 = 1.350 above 1.2 with A > 0 -> clipped, no gradient.
    adv = broadcast_advantages(torch.tensor([1.0, 1.0]), mask).double()
    loss, grad, metrics = _loss_and_grad(log_prob, old, adv, mask, **kw)
    assert loss.item() == pytest.approx((-s0 - 1.2) / 2)
    # d(-s0)/d lp_t = -s0 / 3, times 1/2 for the mean over the two sequences
    torch.testing.assert_close(grad, torch.tensor([[-s0 / 6] * 3, [0.0, 0.0, 0.0]]))
    assert metrics["pg_clipfrac"].item() == pytest.approx(2 / 5)  # seq 1's two tokens of five
    assert metrics["approx_kl_k1"].item() == pytest.approx(-(0.3 - 0.1 + 0.1 + 0.2 + 0.4) / 5)
    assert metrics["seq_ratio_mean"].item() == pytest.approx((s0 + s1) / 2)

    # A = (+1, -1): s1 above the range with A < 0 is NOT clipped: loss s1, gradient s1 / 2 / 2 per token.
    adv = broadcast_advantages(torch.tensor([1.0, -1.0]), mask).double()
    loss, grad, metrics = _loss_and_grad(log_prob, old, adv, mask, **kw)
    assert loss.item() == pytest.approx((-s0 + s1) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-s0 / 6] * 3, [s1 / 4, s1 / 4, 0.0]]))
    assert metrics["pg_clipfrac"].item() == 0.0

    # seq-mean-token-sum: each sequence's loss counted once per token: (3 * -s0 + 2 * s1) / 2
    loss, grad, _ = _loss_and_grad(log_prob, old, adv, mask, loss_agg_mode="seq-mean-token-sum", **kw)
    assert loss.item() == pytest.approx((-3 * s0 + 2 * s1) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-s0 / 2] * 3, [s1 / 2, s1 / 2, 0.0]]))


@pytest.mark.parametrize("mode", ["grpo", "gspo", "gspo_token"])
@pytest.mark.parametrize(
    "log_ratio, advantage, clipped",
    [
        (0.5, 1.0, True),  # r = 1.65 > 1 + high, A > 0: the clipped branch wins, no gradient
        (0.5, -1.0, False),  # r above the range, A < 0: unclipped (PPO sends the full gradient)
        (-0.5, -1.0, True),  # r = 0.61 < 1 - low, A < 0: clipped
        (-0.5, 1.0, False),  # r below the range, A > 0: unclipped
        (0.05, 1.0, False),  # inside the range
        (0.05, -1.0, False),
    ],
)
def test_clip_boundaries(mode, log_ratio, advantage, clipped):
    old = torch.full((1, 4), -1.0)
    log_prob = old + log_ratio
    mask = torch.ones(1, 4)
    adv = torch.full((1, 4), advantage)
    loss, grad, metrics = _loss_and_grad(log_prob, old, adv, mask, mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.3)
    r = math.exp(log_ratio)
    if clipped:
        assert torch.count_nonzero(grad) == 0
        bound = 1.3 if log_ratio > 0 else 0.8
        assert loss.item() == pytest.approx(-advantage * bound)
        assert metrics["pg_clipfrac"].item() == 1.0
    else:
        assert loss.item() == pytest.approx(-advantage * r)
        # every mode: d/d lp_t of the mean over 4 tokens of -A r (gspo: r depends on each lp_t by 1/4)
        torch.testing.assert_close(grad, torch.full((1, 4), -advantage * r / 4))
        assert metrics["pg_clipfrac"].item() == 0.0


# --------------------------------------------------------------------------- independent reference


def _reference(lp, old, adv, mask, mode, low, high, agg):
    """Loss and gradient by loops over python floats, straight from the definitions."""
    B, T = len(lp), len(lp[0])
    n = [sum(mask[i]) for i in range(B)]
    nonempty = sum(1 for x in n if x > 0)
    total_tokens = sum(n)

    def weight(i):  # aggregation weight of each token of sequence i
        return {"token-mean": 1 / total_tokens, "seq-mean-token-sum": 1 / B,
                "seq-mean-token-mean": 1 / (nonempty * max(n[i], 1)), "seq-mean-token-sum-norm": 1 / (B * T)}[agg]

    def ppo(r, a):  # (loss, d loss / d r)
        unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
        return (clipped, 0.0) if clipped > unclipped else (unclipped, -a)

    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        if n[i] == 0:
            continue
        tokens = [t for t in range(T) if mask[i][t]]
        s = math.exp(sum(lp[i][t] - old[i][t] for t in tokens) / n[i])
        a_seq = sum(adv[i][t] for t in tokens) / n[i]
        for t in tokens:
            if mode == "grpo":
                r = math.exp(lp[i][t] - old[i][t])
                value, d_r = ppo(r, adv[i][t])
                grad[i][t] += weight(i) * d_r * r
            elif mode == "gspo_token":
                value, d_r = ppo(s, adv[i][t])
                grad[i][t] += weight(i) * d_r * s  # d s_{i,t} / d lp_t = s (stop-gradient form)
            else:
                value, d_r = ppo(s, a_seq)
                for u in tokens:  # the sequence loss at token t depends on every lp_u by s / n
                    grad[i][u] += weight(i) * d_r * s / n[i]
            loss += weight(i) * value
    return loss, grad


@pytest.mark.parametrize("mode", ["grpo", "gspo", "gspo_token"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_matches_reference(mode, agg):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mode}/{agg}".encode()))
    B, T = 4, 5
    old = -torch.rand(B, T, generator=gen) * 3
    log_prob = old + torch.randn(B, T, generator=gen) * 0.3
    adv = torch.randn(B, T, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    low, high = 0.1, 0.15
    loss, grad, _ = _loss_and_grad(log_prob, old, adv, mask, mode=mode, clip_ratio_low=low, clip_ratio_high=high,
                                   loss_agg_mode=agg)
    ref_loss, ref_grad = _reference(log_prob.tolist(), old.tolist(), adv.tolist(), mask.tolist(), mode, low, high, agg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor(ref_grad), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- equivalences and masking


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gspo_equals_gspo_token_for_sequence_advantages(agg):
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 7
    old = -torch.rand(B, T, generator=gen) * 2
    log_prob = old + torch.randn(B, T, generator=gen) * 0.2
    mask = (torch.rand(B, T, generator=gen) > 0.3).double()
    mask[:, 0] = 1.0
    adv = broadcast_advantages(torch.randn(B, generator=gen), mask).double()
    kw = dict(clip_ratio_low=0.05, clip_ratio_high=0.08, loss_agg_mode=agg)
    seq_loss, seq_grad, seq_metrics = _loss_and_grad(log_prob, old, adv, mask, mode="gspo", **kw)
    tok_loss, tok_grad, tok_metrics = _loss_and_grad(log_prob, old, adv, mask, mode="gspo_token", **kw)
    assert 0.0 < seq_metrics["pg_clipfrac"].item() < 1.0  # some sequences clipped, some not
    torch.testing.assert_close(seq_loss, tok_loss)
    torch.testing.assert_close(seq_grad, tok_grad)
    torch.testing.assert_close(seq_metrics["pg_clipfrac"], tok_metrics["pg_clipfrac"])


@pytest.mark.parametrize("agg", AGG_MODES)
def test_grpo_equals_gspo_for_one_token_sequences(agg):
    gen = torch.Generator().manual_seed(4)
    B, T = 5, 4
    old = -torch.rand(B, T, generator=gen)
    log_prob = old + torch.randn(B, T, generator=gen) * 0.3
    mask = torch.zeros(B, T)
    mask[torch.arange(B), torch.tensor([0, 3, 1, 2, 0])] = 1.0  # one response token per sequence
    adv = broadcast_advantages(torch.randn(B, generator=gen), mask).double()
    kw = dict(clip_ratio_low=0.1, clip_ratio_high=0.1, loss_agg_mode=agg)
    results = [_loss_and_grad(log_prob, old, adv, mask, mode=m, **kw) for m in ("grpo", "gspo", "gspo_token")]
    for loss, grad, _ in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


@pytest.mark.parametrize("mode", ["grpo", "gspo", "gspo_token"])
def test_masked_positions_do_not_matter(mode):
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(3, 6, generator=gen)
    log_prob = old + torch.randn(3, 6, generator=gen) * 0.2
    adv = torch.randn(3, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    kw = dict(mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.2)
    loss, grad, metrics = _loss_and_grad(log_prob, old, adv, mask, **kw)
    noise = torch.where(mask.bool(), 0.0, 100.0)  # garbage (huge ratios, advantages) outside the mask
    loss2, grad2, metrics2 = _loss_and_grad(log_prob + noise, old - noise, adv + noise, mask, **kw)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(grad, grad2)
    assert torch.count_nonzero(grad[~mask.bool()]) == 0
    for key in ("pg_clipfrac", "ratio_mean", "approx_kl_k1", "approx_kl_k3"):
        torch.testing.assert_close(metrics[key], metrics2[key])


@pytest.mark.parametrize("mode", ["grpo", "gspo", "gspo_token"])
def test_extreme_log_ratios_stay_finite(mode):
    old = torch.tensor([[-50.0, -50.0], [-1.0, -1.0]])
    log_prob = torch.tensor([[-0.01, -0.02], [-60.0, -70.0]])  # log-ratios of about +50 and -64
    mask = torch.ones(2, 2)
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    loss, grad, metrics = _loss_and_grad(log_prob.float(), old.float(), adv.float(), mask.float(), mode=mode,
                                         clip_ratio_low=0.2, clip_ratio_high=0.2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    # the first sequence's ratio is clamped to exp(LOG_RATIO_CLAMP); with A = -1 its loss is that ratio,
    # and the second sequence's (ratio ~ 0, A = 1) is ~ 0: the mean over the two is ~ exp(20) / 2
    assert loss.item() >= math.exp(LOG_RATIO_CLAMP) / 2 * 0.99


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_global_denominators_make_micro_batches_add_up(agg):
    gen = torch.Generator().manual_seed(6)
    old = -torch.rand(4, 5, generator=gen)
    log_prob = old + torch.randn(4, 5, generator=gen) * 0.2
    adv = torch.randn(4, 5, generator=gen)
    mask = (torch.rand(4, 5, generator=gen) > 0.4).double()
    mask[:, 0] = 1.0
    kw = dict(mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode=agg)
    full_loss, full_grad, _ = _loss_and_grad(log_prob, old, adv, mask, **kw)
    counts = dict(num_tokens=mask.sum().item(), num_seqs=4.0)
    parts = [_loss_and_grad(log_prob[s], old[s], adv[s], mask[s], **counts, **kw) for s in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad)


def test_shape_and_mode_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"must all be \[B, T\]"):
        policy_loss(x, x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="mode must be"):
        policy_loss(x, x, x, x, mode="ppo")
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        aggregate_loss(x, x, "sum")


# --------------------------------------------------------------------------- KL


def test_kl_penalty_by_hand():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    k1 = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), k1)
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), k1.abs())
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * k1**2)
    k3 = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), k3)
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), k3)
    # low_var_kl as verl computes it: kl = ref - logp clamped to [-20, 20], then exp(kl) - kl - 1
    # clamped to [-10, 10]; between log-ratios 10 and 11 neither clamp acts (the value and its gradient
    # are k3's), beyond that the result is 10
    def verl(logp, ref):
        kl = min(max(ref - logp, -20.0), 20.0)
        return min(max(math.exp(kl) - kl - 1, -10.0), 10.0)

    for logp, ref in ((-40.0, 0.0), (0.0, -40.0), (0.0, -10.5), (0.0, -15.0), (-2.0, 0.0)):
        got = kl_penalty(torch.tensor([[logp]]), torch.tensor([[ref]]), "low_var_kl").item()
        assert got == pytest.approx(verl(logp, ref), rel=1e-9), (logp, ref)
    assert kl_penalty(torch.tensor([[0.0]]), torch.tensor([[-10.5]]), "low_var_kl").item() < 10.0
    with pytest.raises(ValueError, match="kind must be"):
        kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("mode", ["gspo", "gspo_token", "grpo"])
def test_metrics_are_detached(mode):
    """The loss carries the graph; every metric is a plain number (a logged metric holding the graph
    would keep the whole step's activations alive)."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, metrics = policy_loss(lp, torch.full((1, 2), -1.5), torch.ones(1, 2), torch.ones(1, 2), mode=mode,
                                ref_log_prob=torch.full((1, 2), -1.2), kl_coef=0.1)
    assert loss.requires_grad
    assert {k for k, v in metrics.items() if v.requires_grad or v.grad_fn is not None} == set()
    assert {"loss", "pg_loss", "kl_loss", "ratio_mean"} <= set(metrics)


def test_group_advantages_of_one_reward_has_zero_std():
    adv, stats = group_advantages(torch.tensor([3.0]), 1)
    assert adv.tolist() == [0.0] and stats["reward_std"] == 0.0 and stats["reward_mean"] == 3.0


def test_seq_ratio_mean_skips_empty_sequences():
    """The metric is the mean sequence ratio over sequences with response tokens: an empty row (ratio
    exp(0) = 1 by construction) must not pull it towards 1."""
    lp = torch.tensor([[math.log(2.0), math.log(2.0)], [5.0, 5.0]])
    old, adv = torch.zeros(2, 2), torch.ones(2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    _, metrics = policy_loss(lp, old, adv, mask, mode="gspo")
    assert metrics["seq_ratio_mean"].item() == pytest.approx(2.0, rel=1e-12)


def test_kl_term_is_off_by_default_and_added_when_asked():
    old = torch.full((1, 2), -1.0)
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    adv = torch.ones(1, 2)
    kw = dict(mode="grpo", clip_ratio_low=10.0, clip_ratio_high=10.0)
    base, _ = policy_loss(lp, old, adv, mask, ref_log_prob=ref, **kw)
    with_kl, metrics = policy_loss(lp, old, adv, mask, ref_log_prob=ref, kl_coef=0.1, kl_kind="k1", **kw)
    assert "kl_loss" in metrics and metrics["kl_loss"].item() == pytest.approx((0.5 - 1.0) / 2)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * (0.5 - 1.0) / 2)
    with pytest.raises(ValueError, match="needs ref_log_prob"):
        policy_loss(lp, old, adv, mask, kl_coef=0.1, **kw)


# --------------------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, stats = group_advantages(rewards, group_size=4, eps=0.0)
    std0 = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    expected = torch.tensor([[0.5 / std0, -0.5 / std0, 0.5 / std0, -0.5 / std0], [0.0] * 4, [-0.5, -0.5, -0.5, 1.5]])
    torch.testing.assert_close(adv.double(), expected)
    assert stats["zero_std_groups"] == 1.0 and stats["zero_std_fraction"] == pytest.approx(1 / 3)
    assert stats["num_groups"] == 3.0 and stats["reward_mean"] == pytest.approx(7 / 12)
    flat, _ = group_advantages(rewards.reshape(-1), group_size=4, eps=0.0)
    assert flat.shape == (12,)
    torch.testing.assert_close(flat.reshape(3, 4), adv)
    centered, _ = group_advantages(rewards, group_size=4, std_normalize=False)
    torch.testing.assert_close(centered.double(), torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0] * 4, [-0.25] * 3 + [0.75]]))


def test_group_advantages_degenerate_groups():
    adv, stats = group_advantages(torch.full((8,), 0.7), group_size=4)
    assert torch.count_nonzero(adv) == 0 and stats["zero_std_fraction"] == 1.0
    single, _ = group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1)
    assert torch.count_nonzero(single) == 0 and torch.isfinite(single).all()
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(8), group_size=3)
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(2, 4), group_size=3)


# --------------------------------------------------------------------------- dual clip


def test_dual_clip_caps_negative_advantage_losses_by_hand():
    """Per token (grpo): A=+1 at ratio 5 -> PPO clip; A=-1 at ratio 5 -> capped at -A*c = 3 with c=3;
    A=-2 at ratio 1.1 (under c) -> the usual -A*r = 2.2; the capped token has no gradient."""
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[5.0, 5.0, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -2.0]])
    mask = torch.ones(1, 3)
    kw = dict(mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode="seq-mean-token-sum")
    loss, metrics = policy_loss(lp, old, adv, mask, clip_ratio_c=3.0, **kw)
    expected = -1.0 * 1.2 + 3.0 + 2.0 * 1.1
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dlp of -A r = -A r: token 0 clipped (0), token 1 capped (0), token 2: 2 * 1.1
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 2.2]]))
    no_dual, m = policy_loss(lp.detach(), old, adv, mask, **kw)
    assert no_dual.item() == pytest.approx(-1.2 + 5.0 + 2.2, rel=1e-6) and m["pg_clipfrac_lower"].item() == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(lp.detach(), old, adv, mask, clip_ratio_c=0.5, **kw)


def test_default_clip_range_is_the_gspo_papers():
    """policy_loss's defaults clip the sequence ratio to [1 - 3e-4, 1 + 4e-4] (GSPO paper): ratios just
    inside and just outside each bound, with the advantage sign that makes that bound bind."""
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    for ratio, adv, clipped in ((1 - 2.5e-4, -1.0, False), (1 - 3.5e-4, -1.0, True),
                                (1 + 3.5e-4, 1.0, False), (1 + 4.5e-4, 1.0, True)):
        lp = torch.full((1, 2), math.log(ratio))
        loss, metrics = policy_loss(lp, old, torch.full((1, 2), adv), mask)
        bound = (1 - 3e-4) if adv < 0 else (1 + 4e-4)
        assert loss.item() == pytest.approx(-adv * (bound if clipped else ratio), rel=1e-12, abs=0), ratio
        assert metrics["pg_clipfrac"].item() == float(clipped), ratio


def test_dual_clip_leaves_positive_advantages_alone():
    """Only A < 0 is capped: small positive advantages (0 < A < 1, where -A*c is above nothing the PPO
    loss reaches) and A = 0 keep the plain clipped loss and count as no dual clip."""
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[5.0, 0.5, 5.0]]))
    adv = torch.tensor([[0.5, 0.25, 0.0]])
    mask = torch.ones(1, 3)
    kw = dict(mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode="seq-mean-token-sum")
    loss, metrics = policy_loss(lp, old, adv, mask, clip_ratio_c=3.0, **kw)
    # -min(r A, clip(r) A): 5 -> 1.2 for A=0.5; 0.5 -> 0.8 for A=0.25 (the unclipped 0.5 is smaller)
    assert loss.item() == pytest.approx(-0.5 * 1.2 - 0.25 * 0.5, rel=1e-9)
    assert metrics["pg_clipfrac_lower"].item() == 0.0


def test_dual_clip_acts_on_the_sequence_ratio_in_gspo():
    old = torch.zeros(2, 2)
    lp = torch.log(torch.tensor([[4.0, 4.0], [4.0, 4.0]]))
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    mask = torch.ones(2, 2)
    loss, metrics = policy_loss(lp, old, adv, mask, mode="gspo", clip_ratio_low=0.1, clip_ratio_high=0.1,
                                loss_agg_mode="seq-mean-token-mean", clip_ratio_c=2.0)
    # sequence 0: -A*s = 4 capped at 2; sequence 1: clipped to -1.1
    assert loss.item() == pytest.approx((2.0 - 1.1) / 2, rel=1e-6)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(0.5)


def test_kl_metric_is_the_token_mean_whatever_the_aggregation():
    old = lp = torch.zeros(2, 3)
    ref = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    for agg, extra in (("seq-mean-token-sum", {"num_seqs": 1.0}), ("token-mean", {"num_tokens": 1.0})):
        _, metrics = policy_loss(lp, old, torch.zeros(2, 3), mask, mode="grpo", loss_agg_mode=agg, ref_log_prob=ref,
                                 kl_coef=0.1, kl_kind="k1", **extra)
        assert metrics["kl_loss"].item() == pytest.approx(1.0 / 5)  # k1 = lp - ref: one token of 5 at 1.0
