"""Per-token log-probabilities and entropies from megatron's vocab-parallel logits.

The model's output layer leaves logits split over the vocabulary across tensor-parallel ranks
(``[b, s, V/tp]``). Log-probs go through megatron's ``vocab_parallel_cross_entropy`` (one all-reduce
of the max, one of the predicted logit, one of the partition function; its backward is the usual
softmax - one-hot), so they are exact under any TP size and never gather the full vocabulary.

Two adjustments make them the quantity the sampler drew from:
- ``temperature``: logits are divided by it first (as verl and slime do for the actor), so the
  importance ratio compares the tempered behaviour policy with the tempered current one;
- ``vocab_limit``: rows of a padded embedding table (ids >= the tokenizer's size, which the sampler
  never draws) are masked to -inf, matching the generation engine's ``vocab_limit``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megagsm.runtime.collectives import tp_group, tp_rank


def prepare_logits(logits: torch.Tensor, temperature: float = 1.0, vocab_limit: int | None = None) -> torch.Tensor:
    """fp32 logits, divided by the temperature, padded-vocabulary entries at -inf. Always a new tensor
    (megatron's cross entropy works in place on its input)."""
    out = logits.float()
    out = out / temperature if temperature not in (0.0, 1.0) else out.clone()
    if vocab_limit is not None:
        shard = out.shape[-1]
        start = tp_rank() * shard
        if start + shard > vocab_limit:
            padded = torch.arange(start, start + shard, device=out.device) >= vocab_limit
            out = out.masked_fill(padded, float("-inf"))
    return out


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    vocab_limit: int | None = None) -> torch.Tensor:
    """``log pi(labels[b, t] | prefix)`` for vocab-parallel ``logits [b, s, V/tp]``: ``[b, s]`` fp32,
    differentiable. Labels outside the vocabulary (padding) must not be passed unmasked: use a real id
    and mask the position."""
    prepared = prepare_logits(logits, temperature, vocab_limit)
    # megatron's kernel takes [s, b, V/tp] / [s, b]; the layout does not matter to it beyond the last dim
    return -tensor_parallel.vocab_parallel_cross_entropy(prepared, labels)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_limit: int | None = None) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, ``[b, s]`` fp32 (no gradient):
    ``H = log Z - sum_v p_v z_v`` with the sums all-reduced over the tensor-parallel group."""
    z = prepare_logits(logits, temperature, vocab_limit)
    group = tp_group()
    z_max = z.amax(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
    shifted = z - z_max
    exp = shifted.exp()
    # -inf entries: exp is 0 and 0 * -inf would be NaN, so they are zeroed explicitly
    sums = torch.stack([exp.sum(-1), torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(-1)])
    if group is not None:
        dist.all_reduce(sums, group=group)
    partition, weighted = sums[0], sums[1]
    return partition.log() - weighted / partition
