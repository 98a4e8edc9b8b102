"""The two math rewards of verl's seed recipes.

``math_dapo`` (DAPO-Math-17k, AIME; verl's ``math_dapo``): reads only the last 300 characters of the
response; the answer is the last ``Answer: ...`` line (case-insensitive), or, when there is none, the
last ``\\boxed{...}``; answer and ground truth are compared after :func:`minerva_normalize`. Scores
+1 (equal) or -1 (anything else, no answer included).

``math`` (MATH / MATH-500; verl's ``math``): the last ``\\boxed{...}`` of the response, compared with the
ground truth after :func:`hendrycks_normalize`. Scores 1 or 0.

Both take any response and any ground truth and never raise: a ground truth that normalises to nothing
matches nothing, a response without an answer scores as wrong.
"""
from __future__ import annotations

import re
from typing import Any

from megagsm.rewards.latex_answers import hendrycks_equivalent, last_boxed, minerva_normalize
from megagsm.rewards.registry import register_reward

DAPO_TAIL_CHARS = 300  # verl: "the longest answer in MATH-500 has 159 characters"
_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def dapo_extract(solution_str: Any) -> str | None:
    """The answer math_dapo reads: last ``Answer:`` line of the tail, else its last ``\\boxed{}``."""
    tail = _as_text(solution_str)[-DAPO_TAIL_CHARS:]
    lines = _ANSWER_LINE.findall(tail)
    if lines:
        return lines[-1]
    return last_boxed(tail)


def math_dapo_score(solution_str: Any, ground_truth: Any) -> float:
    """+1.0 if the extracted answer equals the ground truth after Minerva normalisation, else -1.0."""
    answer = dapo_extract(solution_str)
    if answer is None:
        return -1.0
    truth = minerva_normalize(_as_text(ground_truth))
    return 1.0 if truth and minerva_normalize(answer) == truth else -1.0


def math_boxed_score(solution_str: Any, ground_truth: Any) -> float:
    """1.0 if the last ``\\boxed{}`` is equivalent to the ground truth (MATH normalisation), else 0.0."""
    answer = last_boxed(_as_text(solution_str))
    truth = _as_text(ground_truth)
    if answer is None or not truth.strip():
        return 0.0
    return 1.0 if hendrycks_equivalent(answer, truth) else 0.0


@register_reward("math_dapo")
def math_dapo(solution_str: str, ground_truth: Any, **kwargs) -> float:
    return math_dapo_score(solution_str, ground_truth)


@register_reward("math")
def math_reward(solution_str: str, ground_truth: Any, **kwargs) -> float:
    return math_boxed_score(solution_str, ground_truth)
