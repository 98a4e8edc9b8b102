"""Name -> reward function registry.

A reward function is ``fn(solution_str: str, ground_truth, **kwargs) -> float``.
"""

from __future__ import annotations

from typing import Callable

RewardFn = Callable[..., float]

_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@register_reward("gsm8k")`` makes ``get_reward("gsm8k")`` return the function."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REWARDS[name].__module__})")
        _REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    try:
        return _REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(_REWARDS)) or '(none)'}") from None


def list_rewards() -> list[str]:
    return sorted(_REWARDS)
