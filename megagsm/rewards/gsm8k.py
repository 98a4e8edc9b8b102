"""GSM8K answer reward.

``strict``: the answer is the number after the last ``####`` (optionally ``$`` and spaces between),
the format the prompt asks for. ``flexible``: the last number anywhere in the text.

Numbers compare by value, exactly: ``1,234`` = ``1234`` = ``$1,234``, ``72.0`` = ``72``, negatives
(``-3``), and simple fractions ``a/b`` equal their decimal value when it terminates (``1/2`` = ``0.5``).
A number starts with a digit (``.5`` reads as ``5``); a minus glued to a word or digit is an operator
(``5-3`` holds the numbers 5 and 3). Values are compared as
:class:`decimal.Decimal`, which is exact for any length, so huge numbers neither overflow nor hit
Python's int-string length limit.

Scores: ``score`` when the extracted answer equals the ground truth, ``format_score`` when an answer
was extracted but differs, ``0.0`` when none was found (strict: no ``#### <number>``; flexible: no
number at all). ``compute_score`` never raises on any ``solution_str`` or ``ground_truth``: a ground
truth that is not a number matches no answer (the data loaders refuse such GSM8K rows up front).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any, Literal

from megagsm.rewards.registry import register_reward

Method = Literal["strict", "flexible"]

# A number: optional minus (not glued to a preceding word or digit: "5-3" is 5 and 3, not 5 and -3),
# then either comma-grouped thousands or plain digits, an optional decimal part, and an optional
# "/denominator". ASCII digits only: unicode digits are not GSM8K answers.
_NUMBER = r"(?:(?<![0-9A-Za-z])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(r"####[ \t]*\$?[ \t]*(-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?)")
# Fractions are evaluated only when short: a 10^6-digit numerator divided exactly would be slow.
_MAX_FRACTION_DIGITS = 60


def parse_number(text: str) -> Decimal | None:
    """The exact value of a number string as matched above (commas, ``$``, sign, ``a/b``); None if not one."""
    if not isinstance(text, str):
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").strip()
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/", 1)
            if len(numerator) + len(denominator) > _MAX_FRACTION_DIGITS:
                return None
            num, den = Decimal(numerator), Decimal(denominator)
            if den == 0:
                return None
            with localcontext() as ctx:
                ctx.prec = 2 * _MAX_FRACTION_DIGITS
                value = num / den
                # Only terminating fractions compare exactly; 1/3 is not any finite decimal answer.
                if value * den != num:
                    return None
            return value
        value = Decimal(cleaned)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def extract_answer(solution_str: str, method: Method = "strict") -> str | None:
    """The answer string the method reads from ``solution_str``; None when there is none."""
    if not isinstance(solution_str, str):
        return None
    if method == "strict":
        matches = _STRICT_RE.findall(solution_str)
    elif method == "flexible":
        matches = _NUMBER_RE.findall(solution_str)
    else:
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    return matches[-1] if matches else None


def _ground_truth_value(ground_truth: Any) -> Decimal | None:
    """The ground truth's value (a number, a number string, or a full GSM8K answer); None if it is
    none of these. The loaders refuse such rows; here it simply matches no answer."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float, Decimal)):
        return None
    text = str(ground_truth)
    if "####" in text:  # a full GSM8K answer was passed
        text = extract_answer(text, "strict") or ""
    return parse_number(text)


def compute_score(
    solution_str: str,
    ground_truth: Any,
    method: Method = "strict",
    format_score: float = 0.0,
    score: float = 1.0,
) -> float:
    """``score`` if the answer read by ``method`` equals ``ground_truth``, ``format_score`` if it differs
    (or the ground truth is not a number), 0.0 if no answer was found. Never raises on any strings."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    answer = extract_answer(solution_str, method)
    if answer is None:
        return 0.0
    value, expected = parse_number(answer), _ground_truth_value(ground_truth)
    if value is None or expected is None:
        return float(format_score)
    return float(score) if value == expected else float(format_score)


@register_reward("gsm8k")
@register_reward("gsm8k_strict")
def gsm8k_strict(solution_str: str, ground_truth: Any, data_source: Any = None, **kwargs) -> float:
    return compute_score(solution_str, ground_truth, method="strict", **kwargs)


@register_reward("gsm8k_flexible")
def gsm8k_flexible(solution_str: str, ground_truth: Any, data_source: Any = None, **kwargs) -> float:
    return compute_score(solution_str, ground_truth, method="flexible", **kwargs)
