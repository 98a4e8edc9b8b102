"""Rollouts: which prompts a step uses, where each one goes, sampling them in-process, scoring them.

Prompt order is a pure function of (seed, step): step ``s`` takes positions ``[s*P, (s+1)*P)`` of an
endless stream of per-epoch permutations of the training set. A resumed run therefore needs only the
step number to continue with the same prompts, whatever its layout.

Placement keeps every group (the ``n`` samples of one prompt) on one data-parallel rank, so group
advantages need no communication, and makes the split into mini-batches independent of the layout:
mini-batch ``k`` is the step's prompts ``[k*P/M, (k+1)*P/M)``, and DP rank ``r`` holds slice ``r`` of
each mini-batch. One optimizer update thus sees the same global set of sequences under TP1, TP2,
DP2 or PP2, which is what makes the update layout-invariant.
"""
from __future__ import annotations


import torch

from megagsm.config.errors import ConfigError
from megagsm.config.generation import GenerationConfig
from megagsm.generation import SamplingParams


class PromptSchedule:
    """Global prompt indices per step: consecutive slices of seeded per-epoch permutations."""

    def __init__(self, num_examples: int, prompts_per_step: int, seed: int):
        if num_examples < 1:
            raise ValueError("the training set is empty")
        self.num_examples, self.prompts_per_step, self.seed = num_examples, prompts_per_step, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_examples, generator=g).tolist()}
        return self._perms[epoch]

    def step_indices(self, step: int) -> list[int]:
        """Example indices of step ``step`` (0-based), in the step's global order."""
        start = step * self.prompts_per_step
        out = []
        for pos in range(start, start + self.prompts_per_step):
            epoch, i = divmod(pos, self.num_examples)
            out.append(self._perm(epoch)[i])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.prompts_per_step / self.num_examples


def check_placement(prompts_per_step: int, mini_batches: int, dp_size: int) -> None:
    if prompts_per_step % (mini_batches * dp_size):
        raise ConfigError(
            f"algorithm.gspo.prompts_per_step={prompts_per_step} must be a multiple of mini_batches*dp="
            f"{mini_batches * dp_size} (mini_batches={mini_batches}, dp={dp_size}): each mini-batch "
            "gives every data-parallel rank whole groups")


def rank_share(prompts_per_step: int, mini_batches: int, dp_size: int, dp_rank: int) -> list[tuple[int, int]]:
    """This DP rank's prompts as (mini-batch, position in the step's global prompt list)."""
    check_placement(prompts_per_step, mini_batches, dp_size)
    per_mb = prompts_per_step // mini_batches
    per_rank = per_mb // dp_size
    return [(k, k * per_mb + dp_rank * per_rank + i) for k in range(mini_batches) for i in range(per_rank)]


def sampling_params(gen: GenerationConfig, n: int, stop_token_ids, seed: int) -> SamplingParams:
    """Rollout sampling. The stored log-probs are the tempered ones (log softmax(logits / T), no
    top-k/top-p truncation): the quantity the trainer recomputes (LossSpec.temperature), so
    logprob_diff_gen compares like with like at any temperature, top-k and top-p."""
    return SamplingParams.from_config(gen, stop_token_ids=stop_token_ids, n=n, seed=seed, logprobs="tempered")


def rollout_seed(base: int, step: int, dp_rank: int) -> int:
    """Distinct, reproducible sampling streams per step and DP rank (TP/PP peers share one)."""
    return (base * 1_000_003 + step * 1009 + dp_rank) % (2**63 - 1)


def stop_token_ids(tokenizer) -> list[int]:
    ids = tokenizer.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    return ids
