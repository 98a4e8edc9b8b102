"""Rewards: a name -> function registry; importing this package registers the built-in rewards.

Built-ins: ``gsm8k`` (= ``gsm8k_strict``, the answer after the last ``####``) and ``gsm8k_flexible``
(the last number in the text). See :mod:`megagsm.rewards.gsm8k`.
"""

from megagsm.rewards.registry import RewardFn, get_reward, list_rewards, register_reward
from megagsm.rewards import gsm8k as _gsm8k  # noqa: F401  (registers the GSM8K rewards)

__all__ = ["RewardFn", "get_reward", "list_rewards", "register_reward"]
