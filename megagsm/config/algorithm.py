"""Which post-training algorithm runs, and GSPO's knobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GSPOConfig:
    n_rollouts: int = 8                # responses sampled per prompt (the group)
    prompts_per_step: int = 8          # prompts per rollout batch
    mini_batches: int = 1              # optimizer steps per rollout batch and epoch
    ppo_epochs: int = 1
    # GSPO's sequence-level ratios sit near 1: the paper uses 3e-4 / 4e-4. For grpo use ~0.2 / 0.28.
    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    loss_mode: Literal["gspo", "gspo_token", "grpo"] = "gspo"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    kl_coef: float = 0.0               # k3 KL to the reference model; 0: no reference model
    adv_std_normalize: bool = True     # divide group-centred rewards by the group std
    filter_zero_std_groups: bool = True  # drop groups whose rewards are all equal (no signal)
    reward: str = "gsm8k"              # registered reward function name
    reward_method: str = "strict"      # the reward's answer-extraction method (gsm8k: strict | flexible)
    # MoE routing replay (megagsm.rl.routing_replay): r2 replays the old-log-prob pass's routing in
    # the update, r3 the rollout's routing in the old-log-prob pass and the update
    routing_replay: Literal["none", "r2", "r3"] = "none"
    # rollout importance-sampling correction pi_old / pi_sampler (megagsm.rl.rollout_correction):
    # tis truncates the weight at the threshold, mis zeroes the loss beyond it
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    rollout_correction_level: Literal["token", "sequence"] = "token"  # sequence: exp(mean log-ratio)
    rollout_correction_threshold: float = 2.0

    def rollouts_per_step(self) -> int:
        return self.n_rollouts * self.prompts_per_step


@dataclass
class AlgorithmConfig:
    name: Literal["sft", "gspo"] = "sft"
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
