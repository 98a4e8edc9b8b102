"""Policy-gradient losses for GSPO / GRPO on ``[B, T]`` per-token log-probabilities.

All tensors are ``[B, T]`` over response positions; ``response_mask`` is 1 on real response tokens.
Advantages are per token (a sequence's advantage broadcast over its tokens, see
:func:`broadcast_advantages`).

Modes (``r`` a ratio, ``A`` an advantage, ``low``/``high`` the clip ranges):

- ``"grpo"``: token ratio ``r_t = pi(y_t) / pi_old(y_t)``, loss per token
  ``-min(r_t A_t, clip(r_t, 1-low, 1+high) A_t)`` (PPO clip).
- ``"gspo"``: one ratio per sequence, the length-normalised likelihood ratio
  ``s_i = exp(mean_t (log pi - log pi_old))``; loss per sequence ``-min(s_i A_i, clip(s_i) A_i)`` with
  ``A_i`` the sequence's advantage (the masked mean of its per-token advantages: use ``gspo_token`` for
  advantages that vary inside a sequence). The sequence loss is placed on each of its tokens and then
  aggregated like any token loss.
- ``"gspo_token"``: GSPO-token from the GSPO paper: ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, whose
  value is ``s_i`` and whose gradient flows through each token; loss per token
  ``-min(s_{i,t} A_{i,t}, clip(s_{i,t}) A_{i,t})``. With a constant advantage per sequence it equals
  ``gspo`` in value and gradient for every aggregation mode below (they weight a sequence's tokens
  equally).

Log-ratios are clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` (20: ``exp(20) ~ 4.9e8`` stays finite in
fp32 and bf16) before ``exp``, so a stale or diverged sample gives a large finite ratio rather than inf
(``inf * 0`` = NaN would poison the whole batch). A clamped ratio has no gradient; it is far outside any
clip range, where PPO-style losses send none for that sign of advantage anyway.

Aggregation (``loss_agg_mode``), with ``m`` the mask, ``l`` the per-token loss, ``B`` sequences:

- ``"token-mean"``: ``sum(l m) / sum(m)``.
- ``"seq-mean-token-sum"``: ``mean_i sum_t l m``.
- ``"seq-mean-token-mean"``: ``mean_i (sum_t l m / sum_t m)`` over sequences with at least one token.
- ``"seq-mean-token-sum-norm"``: ``mean_i (sum_t l m / norm)`` with ``norm = T`` unless given (Dr. GRPO's
  constant normaliser; this averages over sequences where some implementations only sum).

``num_tokens`` / ``num_seqs`` replace the denominators ``sum(m)`` / ``B`` (e.g. with the global counts of
a step split into micro-batches or data-parallel ranks, so gradients add up to the global mean).
"""

from __future__ import annotations

from typing import Literal

import torch

LOG_RATIO_CLAMP = 20.0
PolicyLossMode = Literal["gspo", "gspo_token", "grpo"]
LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "abs", "k2", "k3", "low_var_kl"]
_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_sum(values, mask) / mask.sum().clamp(min=1)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: LossAggMode = "seq-mean-token-mean",
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (see the module docstring)."""
    mask = mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        denominator = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return _masked_sum(loss_mat, mask) / denominator
    token_sums = _masked_sum(loss_mat, mask, dim=-1)
    if loss_agg_mode == "seq-mean-token-sum":
        per_seq = token_sums
        default_seqs = torch.tensor(float(loss_mat.shape[0]), dtype=loss_mat.dtype, device=loss_mat.device)
    elif loss_agg_mode == "seq-mean-token-mean":
        lengths = mask.sum(-1)
        per_seq = token_sums / lengths.clamp(min=1)
        # Empty sequences have no loss and do not count, else they would dilute the mean.
        default_seqs = (lengths > 0).sum().to(loss_mat.dtype).clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        per_seq = token_sums / (norm if norm is not None else loss_mat.shape[-1])
        default_seqs = torch.tensor(float(loss_mat.shape[0]), dtype=loss_mat.dtype, device=loss_mat.device)
    else:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {loss_agg_mode!r}")
    return per_seq.sum() / (num_seqs if num_seqs is not None else default_seqs)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: KLKind = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    ``k1 = log pi - log ref``; ``abs = |k1|``; ``k2 = k1^2 / 2``; ``k3 = exp(-k1) - 1 + k1`` (unbiased,
    non-negative); ``low_var_kl`` is k3 with the log-ratio clamped to [-20, 20] and the result to
    [-10, 10] for stability, as verl's ``kl_penalty`` computes it.
    """
    log_ratio = log_prob - ref_log_prob
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        if kind == "low_var_kl":
            log_ratio = log_ratio.clamp(-20.0, 20.0)
        kl = torch.exp(-log_ratio) - 1.0 + log_ratio
        return kl.clamp(-10.0, 10.0) if kind == "low_var_kl" else kl
    raise ValueError(f"kind must be one of k1, abs, k2, k3, low_var_kl; got {kind!r}")


def _clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element PPO loss ``-min(rA, clip(r)A)``, where the clipped branch is the active one, and
    where dual clipping is: with ``clip_ratio_c`` (Ye et al. 2020, verl's ``clip_ratio_c``) a negative
    advantage's loss is capped at ``-c A``, so a ratio far above 1 cannot push it without bound (the
    capped elements carry no gradient)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, (clipped > unclipped), dual


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: PolicyLossMode = "gspo",
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    loss_agg_mode: LossAggMode = "seq-mean-token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm: float | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "low_var_kl",
    clip_ratio_c: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss and detached metrics (see the module docstring for the modes).

    Default clip ranges are the GSPO paper's (3e-4, 4e-4): sequence ratios sit much closer to 1 than
    token ratios. For ``grpo`` use PPO-sized ranges such as 0.2 / 0.28. The KL term
    ``kl_coef * aggregate(kl_penalty(log_prob, ref_log_prob))`` is added only when ``kl_coef`` > 0;
    its metric ``kl_loss`` is the token-mean KL, whatever the aggregation. ``clip_ratio_c`` (> 1, None:
    off) is the dual clip for negative advantages (see ``_clipped_objective``). ``token_weights``
    ([B, T], detached: megagsm.rl.rollout_correction) multiply the per-token policy-gradient loss
    before aggregation.
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None), got {clip_ratio_c}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape == response_mask.shape) or log_prob.dim() != 2:
        raise ValueError(
            "log_prob, old_log_prob, advantages and response_mask must all be [B, T]; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, {tuple(response_mask.shape)}"
        )
    mask = response_mask.to(log_prob.dtype)
    old_log_prob = old_log_prob.detach()
    advantages = advantages.detach().to(log_prob.dtype)
    token_log_ratio = log_prob - old_log_prob
    lengths = mask.sum(-1).clamp(min=1)
    seq_log_ratio = _masked_sum(token_log_ratio, mask, dim=-1) / lengths  # [B]

    if mode == "grpo":
        ratio = torch.exp(token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        loss_mat, clipped, dual = _clipped_objective(ratio, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    elif mode == "gspo":
        seq_ratio = torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B], differentiable
        seq_advantage = _masked_sum(advantages, mask, dim=-1) / lengths
        seq_loss, seq_clipped, seq_dual = _clipped_objective(seq_ratio, seq_advantage, clip_ratio_low,
                                                             clip_ratio_high, clip_ratio_c)
        loss_mat = seq_loss.unsqueeze(-1).expand_as(log_prob)
        clipped = seq_clipped.unsqueeze(-1).expand_as(log_prob)
        dual = seq_dual.unsqueeze(-1).expand_as(log_prob)
        ratio = seq_ratio.unsqueeze(-1).expand_as(log_prob)
    elif mode == "gspo_token":
        log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        loss_mat, clipped, dual = _clipped_objective(ratio, advantages, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    else:
        raise ValueError(f"mode must be 'gspo', 'gspo_token' or 'grpo', got {mode!r}")

    if token_weights is not None:
        loss_mat = loss_mat * token_weights.detach().to(loss_mat.dtype)
    agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm=norm)
    pg_loss = aggregate_loss(loss_mat, mask, loss_agg_mode, **agg)
    loss = pg_loss
    with torch.no_grad():  # metrics: no graph (hence no .detach() on what is computed in here)
        neg_log_ratio = -token_log_ratio
        metrics = {
            "pg_loss": pg_loss.detach(),
            "pg_clipfrac": _masked_mean(clipped.to(mask.dtype), mask),
            "pg_clipfrac_lower": _masked_mean(dual.to(mask.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "seq_ratio_mean": _masked_mean(torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)),
                                           (mask.sum(-1) > 0).to(mask.dtype)),
            # KL(pi_old || pi) estimated from samples of pi_old: k1 = mean(log old - log new), k3 unbiased.
            "approx_kl_k1": _masked_mean(neg_log_ratio, mask),
            "approx_kl_k3": _masked_mean(torch.expm1(-neg_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) + neg_log_ratio, mask),
        }
    if kl_coef > 0.0:
        if ref_log_prob is None:
            raise ValueError("kl_coef > 0 needs ref_log_prob")
        per_token_kl = kl_penalty(log_prob, ref_log_prob.detach(), kl_kind)
        loss = loss + kl_coef * aggregate_loss(per_token_kl, mask, loss_agg_mode, **agg)
        metrics["kl_loss"] = _masked_mean(per_token_kl.detach(), mask)
    metrics["loss"] = loss.detach()
    return loss, metrics


def broadcast_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages ``[B]`` as per-token ``[B, T]``, zero outside the response."""
    return advantages.unsqueeze(-1).to(torch.float32) * response_mask.to(torch.float32)


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std_normalize: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO/GSPO group-relative advantages: ``(r - mean_group) / (std_group + eps)``.

    ``rewards`` is ``[N * G]`` (groups contiguous) or ``[N, G]``; the result has the same shape. The std is
    the unbiased one (as in the GRPO reference implementations); a group whose rewards are all equal
    gets advantage 0 (it carries no learning signal), and groups of one get 0. Stats: the number and
    fraction of such zero-std groups plus the reward mean and std over the batch.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    shape = rewards.shape
    if rewards.dim() == 2:
        if shape[1] != group_size:
            raise ValueError(f"rewards is {tuple(shape)} but group_size={group_size}")
    elif rewards.dim() != 1 or shape[0] % group_size != 0:
        raise ValueError(f"rewards must be [N * group_size] or [N, group_size], got {tuple(shape)} with group_size={group_size}")
    grouped = rewards.detach().to(torch.float32).reshape(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    zero_std = (grouped.amax(-1) == grouped.amin(-1))
    centered = grouped - mean
    if std_normalize and group_size > 1:
        std = grouped.std(-1, keepdim=True)
        advantages = centered / (std + eps)
    else:
        advantages = centered
    advantages = torch.where(zero_std.unsqueeze(-1), torch.zeros_like(advantages), advantages)
    stats = {
        "num_groups": float(grouped.shape[0]),
        "zero_std_groups": float(zero_std.sum()),
        "zero_std_fraction": float(zero_std.float().mean()),
        "reward_mean": float(grouped.mean()),
        "reward_std": float(grouped.std()) if grouped.numel() > 1 else 0.0,
    }
    return advantages.reshape(shape), stats
