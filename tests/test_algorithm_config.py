"""GSPO config fields of the seed recipes: clip_ratio_c, overlong_buffer, reward choices, defaults."""

from megagsm.config.algorithm import GSPOConfig, OverlongBufferConfig
from megagsm.config.describe import describe_fields
from megagsm.config.loader import load_config


def test_defaults_follow_verl_and_the_gspo_paper():
    g = GSPOConfig()
    assert g.clip_ratio_c == 3.0 and g.filter_zero_std_groups is False
    assert g.overlong_buffer == OverlongBufferConfig(enable=False, len=4096, penalty_factor=1.0)
    assert g.problems(max_response_len=256) == []  # the disabled buffer's len is not checked


def test_overrides_reach_the_fields():
    cfg = load_config(None, ["algorithm.gspo.clip_ratio_c=10.0", "algorithm.gspo.overlong_buffer.enable=true",
                             "algorithm.gspo.overlong_buffer.len=4096", "algorithm.gspo.reward=math_dapo"])
    g = cfg.algorithm.gspo
    assert g.clip_ratio_c == 10.0 and g.overlong_buffer.enable and g.reward == "math_dapo"
    assert g.problems(max_response_len=8192) == []


def test_problems_name_the_fields():
    g = GSPOConfig(clip_ratio_c=1.0, overlong_buffer=OverlongBufferConfig(enable=True, len=9000, penalty_factor=-1))
    assert g.problems(max_response_len=8192) == [
        "algorithm.gspo.clip_ratio_c=1.0 is out of range (allowed: > 1.0)",
        "algorithm.gspo.overlong_buffer.len=9000 is out of range (allowed: 1 to the response limit "
        "generation.max_new_tokens=8192)",
        "algorithm.gspo.overlong_buffer.penalty_factor=-1 is out of range (allowed: >= 0)",
    ]
    assert GSPOConfig(overlong_buffer=OverlongBufferConfig(enable=True, len=0)).problems(10)[0].startswith(
        "algorithm.gspo.overlong_buffer.len=0")


def test_help_lists_the_reward_choices_and_new_fields():
    lines = "\n".join(describe_fields())
    reward = next(x for x in lines.splitlines() if "algorithm.gspo.reward " in x)
    for name in ["gsm8k", "gsm8k_flexible", "math_dapo", "math", "auto"]:
        assert name in reward
    for name in ["clip_ratio_c", "overlong_buffer.enable", "overlong_buffer.len", "overlong_buffer.penalty_factor",
                 "data.messages_key", "data.train_path"]:
        assert name in lines
