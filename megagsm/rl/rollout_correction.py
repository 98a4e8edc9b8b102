"""Rollout importance-sampling correction (``algorithm.gspo.rollout_correction``): TIS and MIS.

The sampler (KV-cache decoding, other batch shapes, bf16, possibly other experts) and the trainer's
old-log-prob pass give the same token slightly different probabilities, so the rollouts are samples
of ``pi_sampler``, not of the ``pi_old`` the GSPO ratio is taken against. The weight
``w = pi_old / pi_sampler`` corrects the policy gradient; it is detached and multiplies the
per-token policy-gradient loss (not the KL term), as in verl's rollout_corr and slime's TIS/MIS:

- level ``token``: ``w_t = exp(old_t - gen_t)``;
- level ``sequence``: ``w = exp(mean_t (old_t - gen_t))``, the exponentiated *mean* log-ratio, which is
  GSPO's own length normalisation: the product of the token ratios would shrink or explode with the
  response length;
- ``tis`` truncates: ``min(w, C)``; ``mis`` masks: ``w`` where ``w <= C``, 0 beyond (the loss of those
  tokens or sequences is zeroed; the loss denominators, token and sequence counts, stay as they are,
  so the correction does not change the loss normalisation).

``gen_t`` must be the log-prob of the distribution sampled from, tempered as the trainer's log-probs
are (LossSpec.temperature): megagsm.rl.rollout.sampling_params stores "processed" (tempered)
log-probs at temperature != 1, and GSPO refuses the correction with top-k / top-p, where the sampler's
log-probs are those of another (truncated) distribution.

Metrics (token-weighted means over response tokens): ``rollout_is_weight_mean`` (the weight applied),
``rollout_is_clip_fraction`` (tokens whose weight exceeded C: truncated or masked), and, from every
old-log-prob pass whatever the correction, the sampler-vs-trainer KL(pi_sampler || pi_old) on the
sampler's samples: ``rollout_kl_k1`` (mean of gen - old) and ``rollout_kl_k3`` (``w - 1 - log w`` of
the token weight, unbiased and non-negative).
"""
from __future__ import annotations

import torch

from megagsm.rl.losses import LOG_RATIO_CLAMP

CORRECTIONS = ("none", "tis", "mis")
LEVELS = ("token", "sequence")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def rollout_weights(old_log_prob: torch.Tensor, gen_log_prob: torch.Tensor, response_mask: torch.Tensor,
                    method: str, level: str, threshold: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[B, T] detached weights (0 outside the response) and their metrics; see the module docstring."""
    if method not in CORRECTIONS[1:]:
        raise ValueError(f"method must be one of {CORRECTIONS[1:]}, got {method!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    mask = response_mask.to(torch.float32)
    token_log_ratio = (old_log_prob.float() - gen_log_prob.float()) * mask
    if level == "token":
        log_w = token_log_ratio
    else:
        log_w = (token_log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(mask)
    raw = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    exceeded = raw > threshold
    weights = raw.clamp(max=threshold) if method == "tis" else torch.where(exceeded, torch.zeros_like(raw), raw)
    weights = weights * mask
    metrics = {"rollout_is_weight_mean": _masked_mean(weights, mask),
               "rollout_is_clip_fraction": _masked_mean(exceeded.to(mask.dtype), mask)}
    return weights, metrics


@torch.no_grad()
def sampler_kl(old_log_prob: torch.Tensor, gen_log_prob: torch.Tensor,
               response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(pi_sampler || pi_old) estimated on the sampler's own samples: k1 and k3 token means."""
    mask = response_mask.to(torch.float32)
    log_ratio = ((old_log_prob.float() - gen_log_prob.float()) * mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return {"rollout_kl_k1": _masked_mean(-log_ratio, mask),
            "rollout_kl_k3": _masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
