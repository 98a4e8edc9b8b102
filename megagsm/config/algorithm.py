"""Which post-training algorithm runs, and GSPO's knobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# built-in reward names (megagsm.rewards); any name registered with register_reward works too
BUILTIN_REWARDS = ("gsm8k", "gsm8k_strict", "gsm8k_flexible", "math_dapo", "math", "auto")


@dataclass
class OverlongBufferConfig:
    """DAPO's soft overlong punishment (verl reward_manager=dapo's overlong_buffer)."""

    enable: bool = False               # add min(-(length - (max_len - len)) / len * penalty_factor, 0) to each reward
    len: int = 4096                    # tokens before the response limit (generation.max_new_tokens) where the penalty starts
    penalty_factor: float = 1.0        # the penalty at the response limit


@dataclass
class GSPOConfig:
    n_rollouts: int = 8                # responses sampled per prompt (the group)
    prompts_per_step: int = 8          # prompts per rollout batch
    mini_batches: int = 1              # optimizer steps per rollout batch and epoch
    ppo_epochs: int = 1
    # GSPO's sequence-level ratios sit near 1: the paper uses 3e-4 / 4e-4. For grpo use ~0.2 / 0.28.
    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    clip_ratio_c: float = 3.0          # dual-clip bound on the ratio for negative advantages (verl's default 3.0; > 1)
    loss_mode: Literal["gspo", "gspo_token", "grpo"] = "gspo"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    kl_coef: float = 0.0               # k3 KL to the reference model; 0: no reference model
    adv_std_normalize: bool = True     # divide group-centred rewards by the group std
    filter_zero_std_groups: bool = False  # drop groups whose rewards are all equal (off: they stay in the mean, as the GSPO paper, verl and TRL)
    reward: str = "gsm8k"              # gsm8k | gsm8k_flexible | math_dapo | math | auto (picked per example from its data_source), or a registered name
    reward_method: str = "strict"      # the reward's answer-extraction method (gsm8k: strict | flexible)
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
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

    def problems(self, max_response_len: int) -> list[str]:
        """Range problems of the fields above that config/validate.py does not check, each naming its
        field; ``max_response_len`` is the response limit (generation.max_new_tokens)."""
        out = []
        if not self.clip_ratio_c > 1.0:
            out.append(f"algorithm.gspo.clip_ratio_c={self.clip_ratio_c!r} is out of range (allowed: > 1.0)")
        ob = self.overlong_buffer
        if ob.enable:
            if not 1 <= ob.len <= max_response_len:
                out.append(f"algorithm.gspo.overlong_buffer.len={ob.len!r} is out of range (allowed: 1 to the "
                           f"response limit generation.max_new_tokens={max_response_len})")
            if not ob.penalty_factor >= 0:
                out.append(f"algorithm.gspo.overlong_buffer.penalty_factor={ob.penalty_factor!r} is out of "
                           "range (allowed: >= 0)")
        return out


@dataclass
class AlgorithmConfig:
    name: Literal["sft", "gspo"] = "sft"
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
