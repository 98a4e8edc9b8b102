"""DAPO's soft overlong punishment: responses that run into the last ``buffer_len`` tokens before
``max_response_len`` lose reward linearly, up to ``penalty_factor`` at the limit:

    penalty = min(-(length - (max_response_len - buffer_len)) / buffer_len * penalty_factor, 0)

added to the score (``algorithm.gspo.overlong_buffer.{enable,len,penalty_factor}``; verl's
``reward_manager=dapo``).
"""
from __future__ import annotations


def overlong_penalty(length: int, max_response_len: int, buffer_len: int, penalty_factor: float) -> float:
    """The (non-positive) penalty of a response of ``length`` tokens."""
    if buffer_len <= 0 or buffer_len > max_response_len:
        raise ValueError(f"buffer_len must be in [1, max_response_len={max_response_len}], got {buffer_len}")
    expected = max_response_len - buffer_len
    return min(-(length - expected) / buffer_len * penalty_factor, 0.0)
