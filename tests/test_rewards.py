"""GSM8K reward and the reward registry."""

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megagsm.rewards import get_reward, list_rewards, register_reward
from megagsm.rewards.gsm8k import compute_score, extract_answer, parse_number

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "text, truth, strict, flexible",
    [
        (NATALIA, "72", 1.0, 1.0),
        (NATALIA, NATALIA, 1.0, 1.0),  # a full GSM8K answer as ground truth
        ("The answer is 72", "72", 0.0, 1.0),  # no "####": strict finds nothing
        ("#### 71", "72", 0.0, 0.0),
        ("#### 1,234", "1234", 1.0, 1.0),
        ("#### $1,234", "1,234", 1.0, 1.0),
        ("####$5", "5", 1.0, 1.0),
        ("#### 72.0", "72", 1.0, 1.0),
        ("#### 72.50", "72.5", 1.0, 1.0),
        ("#### -3", "-3", 1.0, 1.0),
        ("#### 3", "-3", 0.0, 0.0),
        ("#### 1/2", "0.5", 1.0, 1.0),
        ("#### 1/3", "0.5", 0.0, 0.0),
        ("#### 7\nwait, #### 8", "8", 1.0, 1.0),  # the last one counts
        ("#### 8 and then 9 apples", "8", 1.0, 0.0),
        ("10 - 3 = 7", "7", 0.0, 1.0),
        ("5-3", "3", 0.0, 1.0),  # a minus between digits is an operator
        ("it is -4.", "-4", 0.0, 1.0),
        ("#### forty", "40", 0.0, 0.0),
        ("", "1", 0.0, 0.0),
        ("#### 10", 10, 1.0, 1.0),  # integer ground truth
    ],
)
def test_compute_score_cases(text, truth, strict, flexible):
    assert compute_score(text, truth, method="strict") == strict
    assert compute_score(text, truth, method="flexible") == flexible


def test_format_score_only_when_an_answer_was_found():
    assert compute_score("#### 71", "72", format_score=0.1) == 0.1
    assert compute_score("no answer here", "72", format_score=0.1) == 0.0
    assert compute_score("#### 72", "72", format_score=0.1, score=2.0) == 2.0
    assert compute_score("I think 5", "72", method="flexible", format_score=0.1) == 0.1
    assert compute_score("nothing", "72", method="flexible", format_score=0.1) == 0.0


def test_huge_numbers_are_exact():
    big = "9" * 5000
    assert compute_score(f"#### {big}", big) == 1.0
    assert compute_score(f"#### {big}8", big) == 0.0
    assert compute_score(f"#### {big}/{big}", "1") == 0.0  # too long to evaluate as a fraction: not an answer match
    assert parse_number("1" * 100_000) is not None


def test_extract_and_parse():
    assert extract_answer("a #### 12 b #### 13", "strict") == "13"
    assert extract_answer("x 1,000,000 y", "flexible") == "1,000,000"
    assert parse_number("$1,234.50") == parse_number("1234.5")
    assert parse_number("3/0") is None and parse_number("") is None and parse_number("NaN") is None
    with pytest.raises(ValueError, match="method must be"):
        compute_score("#### 1", "1", method="loose")
    # a ground truth that is not a number matches no answer (the loaders refuse such GSM8K rows)
    assert compute_score("#### 1", "abc") == 0.0
    assert compute_score("#### 1", "abc", format_score=0.25) == 0.25
    assert compute_score("no answer", "abc", format_score=0.25) == 0.0
    assert compute_score("#### 1", None) == 0.0 and compute_score(None, "1") == 0.0


# Ground truths of every kind: any text (numbers, full GSM8K answers, garbage), None, numbers.
_TRUTHS = (st.text(max_size=300) | st.integers(min_value=-(10**30), max_value=10**30).map(str)
           | st.text(max_size=50).map(lambda t: t + "\n#### " + t) | st.none() | st.integers() | st.floats())


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300) | st.text(alphabet="#$ ,.-/0123456789\n", max_size=60), truth=_TRUTHS)
def test_never_raises_on_arbitrary_text(text, truth):
    # compute_score has no catch-all: an exception inside it fails this test
    # (tests/test_math_rewards.py::test_never_raises_tests_can_fail plants one to prove it)
    for method in ("strict", "flexible"):
        value = compute_score(text, truth, method=method, format_score=0.25)
        assert value in (0.0, 0.25, 1.0)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(max_size=50),
    number=st.integers(min_value=-(10**400), max_value=10**400),
    decorate=st.sampled_from(["{:d}", "{:,d}", "${:,d}", "{:d}.0", "{:d}.000"]),
)
def test_correct_answers_score_under_any_prefix(prefix, number, decorate):
    text = decorate.format(number)  # "$-1,000" for negatives, which the strict pattern accepts
    # The strict format is found whatever precedes it; the prefix may not break the number apart.
    assert compute_score(f"{prefix}\n#### {text}", str(number)) == 1.0


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=2000))
def test_weird_unicode(text):
    assert compute_score(text + "٣٤ #### ⁵", "5") == 0.0  # non-ASCII digits are not answers
    assert compute_score(text + "\n#### 5", "5") == 1.0


def test_registry():
    assert {"gsm8k", "gsm8k_strict", "gsm8k_flexible"} <= set(list_rewards())
    assert get_reward("gsm8k")(NATALIA, "72") == 1.0
    assert get_reward("gsm8k_flexible")("so 72", "72") == 1.0
    assert get_reward("gsm8k_strict")("so 72", "72") == 0.0
    with pytest.raises(KeyError, match="unknown reward 'nope'; known rewards: .*gsm8k_flexible"):
        get_reward("nope")

    @register_reward("test_always_one")
    def always_one(solution_str, ground_truth, **kwargs):
        return 1.0

    assert get_reward("test_always_one") is always_one
    register_reward("test_always_one")(always_one)  # re-registering the same function is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_always_one")(lambda s, g: 0.0)


def test_fractions_up_to_sixty_digits_are_evaluated():
    """Fractions are evaluated exactly while numerator and denominator have 60 digits together
    (longer ones are not numbers: an exact division of huge numbers would be slow)."""
    assert parse_number("1/1" + "0" * 58) == Decimal("1e-58")          # 1 + 59 digits
    assert parse_number("25/1" + "0" * 57) == Decimal("2.5e-56")        # 2 + 58 digits
    assert parse_number("1/1" + "0" * 59) is None                       # 61 digits
