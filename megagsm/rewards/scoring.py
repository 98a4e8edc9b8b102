"""Scoring a batch of rollouts as ``algorithm.gspo`` says: the reward function (``reward`` and
``reward_method``; ``auto`` per example from its ``data_source``) plus DAPO's overlong penalty when
``overlong_buffer.enable``. The GSPO trainer and the evaluation call :func:`make_batch_scorer` once and
then score every batch with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from megagsm.config.errors import ConfigError
from megagsm.rewards.by_source import check_sources
from megagsm.rewards.overlong import overlong_penalty
from megagsm.rewards.registry import RewardFn, get_reward, list_rewards


def resolve_reward(name: str, method: str = "strict") -> RewardFn:
    """The function of ``algorithm.gspo.reward`` (``gsm8k`` + ``reward_method`` -> ``gsm8k_strict`` /
    ``gsm8k_flexible``); a ConfigError naming the field and the known rewards otherwise."""
    available = list_rewards()
    for candidate in (f"{name}_{method}", name):
        if candidate in available:
            return get_reward(candidate)
    raise ConfigError(f"algorithm.gspo.reward={name!r} is not a registered reward (known: {', '.join(available)})")


@dataclass
class BatchScorer:
    fn: RewardFn
    overlong_len: int = 0              # 0: no overlong penalty
    overlong_factor: float = 1.0
    max_response_len: int = 0

    def scores(self, texts: Sequence[str], ground_truths: Sequence[Any], data_sources: Sequence[str]) -> list[float]:
        """The reward function's own score of each response (no length penalty)."""
        return [float(self.fn(t, g, data_source=s)) for t, g, s in zip(texts, ground_truths, data_sources)]

    def with_penalty(self, scores: Sequence[float], lengths: Sequence[int] | None) -> list[float]:
        """`scores` plus the overlong penalty, when enabled (``lengths``: response token counts)."""
        scores = list(scores)
        if self.overlong_len:
            if lengths is None:
                raise ValueError("the overlong penalty needs the response lengths")
            scores = [r + overlong_penalty(n, self.max_response_len, self.overlong_len, self.overlong_factor)
                      for r, n in zip(scores, lengths)]
        return scores

    def rewards(self, texts: Sequence[str], ground_truths: Sequence[Any], data_sources: Sequence[str],
                lengths: Sequence[int] | None = None) -> list[float]:
        """The reward of each response (``lengths``: its token count, needed with the overlong penalty)."""
        return self.with_penalty(self.scores(texts, ground_truths, data_sources), lengths)


def scorer_for(reward: str, method: str = "strict", data_sources: Sequence[str] = ()) -> BatchScorer:
    """The scorer of a reward name without length penalty (held-out evaluation). With ``auto`` the
    ``data_sources`` of the data set are checked up front, so an unknown source fails before scoring."""
    fn = resolve_reward(reward, method)
    if reward == "auto":
        check_sources(data_sources)
    return BatchScorer(fn)


def make_batch_scorer(gspo_config, max_response_len: int, data_sources: Sequence[str] = ()) -> BatchScorer:
    """The scorer of an ``algorithm.gspo`` config section (scorer_for plus DAPO's overlong penalty);
    ``max_response_len`` is the response limit (generation.max_new_tokens)."""
    scorer = scorer_for(gspo_config.reward, gspo_config.reward_method, data_sources)
    ob = gspo_config.overlong_buffer
    if not ob.enable:
        return scorer
    return BatchScorer(scorer.fn, overlong_len=ob.len, overlong_factor=ob.penalty_factor,
                       max_response_len=max_response_len)
