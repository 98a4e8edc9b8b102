"""math_dapo, math, auto and the overlong penalty: a table of tricky cases, each expected value worked
out by hand from the definitions (issue 12, verl's reward_score), and never-raises properties."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megagsm.config.algorithm import BUILTIN_REWARDS
from megagsm.errors import UserError
from megagsm.rewards import check_sources, get_reward, list_rewards, overlong_penalty, reward_name_for_source
from megagsm.rewards.latex_answers import last_boxed

PAD = "x" * 300  # pushes earlier text out of math_dapo's last-300-characters window

# (response, ground truth, score, why)
MATH_DAPO_CASES = [
    ("Answer: 42", "42", 1.0, "plain"),
    ("so\nanswer: 42", "42", 1.0, "'Answer:' is case-insensitive"),
    ("ANSWER:42", "42", 1.0, "no space after the colon"),
    ("Answer: 41", "42", -1.0, "wrong answers score -1, not 0"),
    ("The answer is 42", "42", -1.0, "no 'Answer:' line and no box"),
    ("Answer: 3\nAnswer: 4", "4", 1.0, "the last Answer line counts"),
    ("Answer: 3\nAnswer: 4", "3", -1.0, "the last Answer line counts"),
    ("Answer: 1,000", "1000", 1.0, "commas dropped from integers"),
    ("Answer: 1,000.5", "1000.5", -1.0, "only integers lose their commas"),
    ("Answer: $\\frac{1}{2}$", "\\frac{1}{2}", 1.0, "$...$ dropped"),
    ("Answer: \\frac12", "\\frac{1}{2}", 1.0, "\\fracab -> \\frac{a}{b}"),
    ("Answer: \\dfrac{1}{2}", "\\frac{1}{2}", -1.0, "Minerva does not map \\dfrac (verl neither)"),
    ("Answer: 42.", "42", -1.0, "a trailing period stays (verl's normalisation keeps it)"),
    ("Answer: $5$.", "5", 1.0, "only the $...$ part is kept"),
    ("Answer: 5 dollars", "5", 1.0, "unit words dropped"),
    ("Answer: 10 cm", "10", 1.0, "unit words dropped"),
    ("Answer: 90^\\circ", "90", 1.0, "degrees dropped"),
    ("Answer: x = 5", "5", 1.0, "the text after the last '=' counts"),
    ("Answer: \\text{(B)}", "(B)", 1.0, "\\text{} unwrapped"),
    ("Answer: 42 ", " 42", 1.0, "surrounding spaces"),
    ("thus \\boxed{42}", "42", 1.0, "no Answer line: the last \\boxed{} counts"),
    ("\\boxed{1} or \\boxed{2}", "2", 1.0, "the last of several boxes"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", 1.0, "nested braces"),
    ("\\boxed{3}\nAnswer: 4", "4", 1.0, "an Answer line wins over a box"),
    ("\\boxed{4", "4", -1.0, "an unclosed box is no answer"),
    ("Answer: 42" + PAD, "42", -1.0, "only the last 300 characters are read"),
    (PAD + "Answer: 42", "42", 1.0, "only the last 300 characters are read"),
    ("", "42", -1.0, "empty response"),
    (None, "42", -1.0, "None response"),
    ("Answer: 42", None, -1.0, "None ground truth matches nothing"),
    ("Answer: $ $", "", -1.0, "an empty ground truth matches nothing"),
    ("Answer: 7", 7, 1.0, "a numeric ground truth"),
]

MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "\\frac12", 1.0, "\\frac12 -> \\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0, "\\dfrac -> \\frac"),
    ("\\boxed{\\tfrac{1}{2}}", "\\frac{1}{2}", 1.0, "\\tfrac -> \\frac"),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, "0.5 -> \\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0, "a/b -> \\frac{a}{b}"),
    ("\\boxed{.5}", "0.5", 1.0, "a leading zero added"),
    ("\\boxed{\\sqrt{\\frac{3}{4}}}", "\\sqrt{\\frac{3}{4}}", 1.0, "nested braces"),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0, "\\sqrt2 -> \\sqrt{2}"),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0, "units after '\\text{ ' dropped"),
    ("\\boxed{90^\\circ}", "90", 1.0, "degrees dropped"),
    ("\\boxed{10\\%}", "10", 1.0, "an escaped percent sign dropped"),
    ("\\boxed{x=3}", "3", 1.0, "a short 'x =' prefix dropped"),
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", 1.0, "\\left/\\right and spaces dropped"),
    ("\\boxed{1,000}", "1000", 0.0, "commas stay (as in the MATH reference)"),
    ("\\boxed{5.}", "5", 0.0, "a trailing period stays (as in the MATH reference)"),
    ("\\boxed{1} and then \\boxed{2}", "2", 1.0, "the last box counts"),
    ("\\boxed{1} and then \\boxed{2}", "1", 0.0, "the last box counts"),
    ("\\boxed 5$", "5", 1.0, "'\\boxed 5' without braces"),
    ("\\fbox{3}", "3", 1.0, "\\fbox"),
    ("\\boxed{5", "5", 0.0, "an unclosed box is no answer"),
    ("The answer is 5", "5", 0.0, "no box: no answer"),
    ("Answer: 5", "5", 0.0, "an Answer line is not a box"),
    ("", "5", 0.0, "empty response"),
    (None, "5", 0.0, "None response"),
    ("\\boxed{5}", None, 0.0, "None ground truth"),
    ("\\boxed{}", "", 0.0, "an empty ground truth matches nothing"),
]


@pytest.mark.parametrize("response, truth, expected, why", MATH_DAPO_CASES)
def test_math_dapo_cases(response, truth, expected, why):
    assert get_reward("math_dapo")(response, truth) == expected, why


@pytest.mark.parametrize("response, truth, expected, why", MATH_CASES)
def test_math_cases(response, truth, expected, why):
    assert get_reward("math")(response, truth) == expected, why


def test_last_boxed():
    assert last_boxed("a \\boxed{x} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("\\boxed{a") is None and last_boxed("nothing") is None and last_boxed(None) is None
    assert last_boxed("\\boxedx{1}") is None  # not a box command


# (data_source, the reward auto must pick)
SOURCES = [
    ("openai/gsm8k", "gsm8k"),
    ("lighteval/MATH", "math"),
    ("DigitalLearningGmbH/MATH-lighteval", "math"),
    ("HuggingFaceH4/MATH-500", "math"),
    ("math_dapo", "math_dapo"),
    ("math", "math_dapo"),
    ("aime-2024", "math_dapo"),
    ("aime25", "math_dapo"),
]


@pytest.mark.parametrize("source, name", SOURCES)
def test_auto_picks_by_data_source(source, name):
    assert reward_name_for_source(source) == name
    # one response that each reward scores differently: "#### 5" (gsm8k 1), box (math 1), neither (dapo -1)
    responses = {"gsm8k": "#### 5", "math": "\\boxed{5}", "math_dapo": "Answer: 5"}
    auto = get_reward("auto")
    for kind, text in responses.items():
        assert auto(text, "5", data_source=source) == get_reward(name)(text, "5")
    assert auto(responses[name], "5", data_source=source) == 1.0


def test_auto_unknown_source_names_it_and_the_known_ones():
    for source in ["my/dataset", None]:
        with pytest.raises(UserError) as info:
            get_reward("auto")("Answer: 5", "5", data_source=source)
        message = str(info.value)
        assert f"no reward for data_source {source!r}" in message
        assert "openai/gsm8k" in message and "HuggingFaceH4/MATH-500" in message and "aime*" in message
    check_sources(["openai/gsm8k", "math_dapo", "openai/gsm8k"])
    with pytest.raises(UserError, match="'nope'"):
        check_sources(["openai/gsm8k", "nope"])


def test_builtin_rewards_are_registered():
    assert set(BUILTIN_REWARDS) <= set(list_rewards())


@pytest.mark.parametrize("length, expected", [(0, 0.0), (4096, 0.0), (5120, -0.25), (6144, -0.5), (8192, -1.0),
                                              (9216, -1.25)])
def test_overlong_penalty_dapo_formula(length, expected):
    # max 8192, buffer 4096 (the 30B seeds): the penalty starts at 8192 - 4096 = 4096 tokens, -1 at 8192
    assert overlong_penalty(length, 8192, 4096, 1.0) == pytest.approx(expected)
    assert overlong_penalty(length, 8192, 4096, 0.5) == pytest.approx(expected / 2)


def test_overlong_penalty_bad_buffer():
    for buffer_len in (0, -1, 9000):
        with pytest.raises(ValueError, match="buffer_len must be in"):
            overlong_penalty(10, 8192, buffer_len, 1.0)


# ----------------------------------------------------------------------------------------- never raises

# Fragments that reach the deeper branches (boxes, Answer lines, fractions, units, dollars, '=').
_PIECES = st.sampled_from(["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "Answer:", "answer :", "####", "$", "\\$",
                           "\\frac", "\\dfrac", "\\sqrt", "\\text{ ", "\\text{", "\\left(", "\\right)", "^\\circ",
                           "=", "/", ".", ",", "%", "\\%", "-", " ", "\n", "0", "1", "12", "3.5", "x", "cm", "dollars",
                           "\\", "٣", "\x00"])
LATEXISH = st.lists(_PIECES | st.text(max_size=5), max_size=40).map("".join)
ANY_TEXT = st.text(max_size=400) | LATEXISH
ANY_TRUTH = ANY_TEXT | st.none() | st.integers() | st.floats() | st.booleans()
ALLOWED = {"gsm8k": {0.0, 1.0}, "gsm8k_strict": {0.0, 1.0}, "gsm8k_flexible": {0.0, 1.0},
           "math_dapo": {-1.0, 1.0}, "math": {0.0, 1.0}}


@settings(max_examples=400, deadline=None)
@given(response=ANY_TEXT, truth=ANY_TRUTH)
def test_no_reward_raises_on_any_input(response, truth):
    for name, allowed in ALLOWED.items():
        assert get_reward(name)(response, truth) in allowed, name
    for source, name in SOURCES:
        assert get_reward("auto")(response, truth, data_source=source) in ALLOWED[name]


@settings(max_examples=200, deadline=None)
@given(response=ANY_TEXT, truth=ANY_TEXT)
def test_a_response_scores_like_its_ground_truth_boxed(response, truth):
    # a box holding the ground truth itself is right whenever the truth normalises to something
    boxed = get_reward("math")("\\boxed{" + truth + "}", truth)
    assert boxed in (0.0, 1.0)
    if not any(c in truth for c in ("{", "}", "\\boxed", "\\fbox")) and truth.strip():
        assert boxed == 1.0


def test_never_raises_tests_can_fail(monkeypatch):
    """The rewards do not swallow exceptions: a failure inside them reaches the property tests."""
    from megagsm.rewards import gsm8k, math_rewards

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(gsm8k, "parse_number", broken)
    monkeypatch.setattr(math_rewards, "minerva_normalize", broken)
    monkeypatch.setattr(math_rewards, "hendrycks_equivalent", broken)
    for name, text in [("gsm8k", "#### 5"), ("math_dapo", "Answer: 5"), ("math", "\\boxed{5}")]:
        with pytest.raises(RuntimeError, match="planted"):
            get_reward(name)(text, "5")


def test_float_ground_truths():
    assert get_reward("gsm8k")("#### 72", 72.0) == 1.0
    assert get_reward("gsm8k")("#### 72", math.nan) == 0.0


def test_batch_scorer_from_the_gspo_config():
    from megagsm.config.algorithm import GSPOConfig, OverlongBufferConfig
    from megagsm.config.errors import ConfigError
    from megagsm.rewards.scoring import make_batch_scorer

    texts = ["#### 5", "Answer: 5", "\\boxed{5}", "5"]
    sources = ["openai/gsm8k", "math_dapo", "HuggingFaceH4/MATH-500", "openai/gsm8k"]
    auto = make_batch_scorer(GSPOConfig(reward="auto"), 100, sources)
    assert auto.rewards(texts, ["5"] * 4, sources) == [1.0, 1.0, 1.0, 0.0]
    flexible = make_batch_scorer(GSPOConfig(reward="gsm8k", reward_method="flexible"), 100)
    assert flexible.rewards(texts, ["5"] * 4, sources) == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="no reward for data_source 'mine'"):
        make_batch_scorer(GSPOConfig(reward="auto"), 100, ["openai/gsm8k", "mine"])
    with pytest.raises(ConfigError, match=r"algorithm.gspo.reward='nope' is not a registered reward"):
        make_batch_scorer(GSPOConfig(reward="nope"), 100)
    # overlong: max 100, buffer 40 -> the penalty starts at 60 tokens; at 80: -(20 / 40) * factor 2 = -1
    dapo = make_batch_scorer(GSPOConfig(reward="math_dapo", overlong_buffer=OverlongBufferConfig(True, 40, 2.0)), 100)
    assert dapo.rewards(["Answer: 5", "Answer: 4"], ["5", "5"], ["math_dapo"] * 2, [60, 80]) == [1.0, -2.0]
    with pytest.raises(ValueError, match="needs the response lengths"):
        dapo.rewards(["Answer: 5"], ["5"], ["math_dapo"])
