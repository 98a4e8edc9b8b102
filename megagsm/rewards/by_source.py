"""``reward: auto``: the reward of each example picked from its ``data_source``, as verl's
``default_compute_score`` does:

- ``openai/gsm8k`` -> ``gsm8k`` (strict: the number after the last ``####``),
- ``lighteval/MATH``, ``DigitalLearningGmbH/MATH-lighteval``, ``HuggingFaceH4/MATH-500`` -> ``math``,
- ``math_dapo``, ``math`` and every source starting with ``aime`` -> ``math_dapo``.

Any other source is a data error: a UserError naming it and the known ones.
"""
from __future__ import annotations

from typing import Any

from megagsm.errors import UserError
from megagsm.rewards.registry import get_reward, register_reward

SOURCE_REWARDS = {
    "openai/gsm8k": "gsm8k",
    "lighteval/MATH": "math",
    "DigitalLearningGmbH/MATH-lighteval": "math",
    "HuggingFaceH4/MATH-500": "math",
    "math_dapo": "math_dapo",
    "math": "math_dapo",
}
PREFIX_REWARDS = {"aime": "math_dapo"}


def reward_name_for_source(data_source: Any) -> str:
    """The registered reward name for ``data_source``; UserError for a source without one."""
    if isinstance(data_source, str):
        if data_source in SOURCE_REWARDS:
            return SOURCE_REWARDS[data_source]
        for prefix, name in PREFIX_REWARDS.items():
            if data_source.startswith(prefix):
                return name
    known = ", ".join(list(SOURCE_REWARDS) + [f"{p}*" for p in PREFIX_REWARDS])
    raise UserError(f"algorithm.gspo.reward=auto: no reward for data_source {data_source!r}; known sources: "
                    f"{known} (or set algorithm.gspo.reward to gsm8k, math or math_dapo)")


def check_sources(data_sources) -> None:
    """Raise the UserError of :func:`reward_name_for_source` for the first unknown source (call it once
    at start-up so a bad file fails before any rollout)."""
    for source in dict.fromkeys(data_sources):
        reward_name_for_source(source)


@register_reward("auto")
def auto(solution_str: str, ground_truth: Any, data_source: Any = None, **kwargs) -> float:
    """The reward of ``data_source`` (a keyword: the example's ``data_source``)."""
    return float(get_reward(reward_name_for_source(data_source))(solution_str, ground_truth, **kwargs))
