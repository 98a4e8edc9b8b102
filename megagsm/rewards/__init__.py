"""Rewards: a name -> function registry; importing this package registers the built-in rewards.

Built-ins: ``gsm8k`` (= ``gsm8k_strict``, the answer after the last ``####``) and ``gsm8k_flexible``
(the last number in the text), see :mod:`megagsm.rewards.gsm8k`; ``math_dapo`` (+1/-1, the last
``Answer:`` line or ``\\boxed{}``) and ``math`` (``\\boxed{}`` + MATH equivalence), see
:mod:`megagsm.rewards.math_rewards`; ``auto`` (per example from its ``data_source``), see
:mod:`megagsm.rewards.by_source`. :func:`overlong_penalty` is DAPO's length penalty.

Every reward takes ``(solution_str, ground_truth, **kwargs)`` and never raises on any strings.
"""

from megagsm.rewards.registry import RewardFn, get_reward, list_rewards, register_reward
from megagsm.rewards import gsm8k as _gsm8k  # noqa: F401  (registers the GSM8K rewards)
from megagsm.rewards import math_rewards as _math_rewards  # noqa: F401  (registers math_dapo, math)
from megagsm.rewards import by_source as _by_source  # noqa: F401  (registers auto)
from megagsm.rewards.by_source import check_sources, reward_name_for_source
from megagsm.rewards.overlong import overlong_penalty
from megagsm.rewards.scoring import BatchScorer, make_batch_scorer, resolve_reward, scorer_for

__all__ = ["RewardFn", "get_reward", "list_rewards", "register_reward", "overlong_penalty", "make_batch_scorer",
           "reward_name_for_source", "check_sources", "BatchScorer", "resolve_reward", "scorer_for"]
