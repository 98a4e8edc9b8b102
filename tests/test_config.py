"""Config loading (YAML + overrides), error messages, and layout validation."""
from __future__ import annotations

import dataclasses
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megagsm.config import (ConfigError, ParallelConfig, RunConfig, load_config, save_config, to_yaml,
                            validate, validate_model_layout)
from megagsm.config.layout import divisors

TINY_YAML = """\
model:
  init: random
  family: qwen2
  hidden_size: 64
  num_layers: 4
  num_attention_heads: 8
  num_query_groups: 2
  ffn_hidden_size: 128
  vocab_size: 256
parallel:
  tp: 2
data:
  truncation: right
train:
  global_batch_size: 4
  lora:
    enabled: true
    targets: [linear_qkv, linear_proj]
generation:
  stop: ["\\n\\n", "Question:"]
"""


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return str(path)


def load_error(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    return message


def validate_error(cfg: RunConfig, world_size: int) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


def tiny(tiny_yaml, *overrides) -> RunConfig:
    return load_config(tiny_yaml, list(overrides))


# ---------------------------------------------------------------- loading

def test_defaults_are_typed_dataclasses():
    cfg = load_config(None, [])
    assert isinstance(cfg, RunConfig) and dataclasses.is_dataclass(cfg.train.lora)
    assert cfg.parallel == ParallelConfig()
    assert cfg.train.lora.targets == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def test_yaml_then_overrides_in_order(tiny_yaml):
    cfg = load_config(tiny_yaml, ["parallel.tp=4", "optim.lr=3e-4", "parallel.tp=1",
                                  "train.lora.targets=[linear_fc1]", "model.num_experts=4"])
    assert cfg.parallel.tp == 1  # the last override wins
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.truncation == "right"  # from the file
    assert cfg.model.hidden_size == 64 and cfg.model.num_experts == 4
    assert cfg.train.lora.enabled is True and cfg.train.lora.targets == ["linear_fc1"]
    assert isinstance(cfg.train.lora.targets, list)
    assert cfg.generation.stop == ["\n\n", "Question:"]
    assert cfg.train.micro_batch_size == 1  # untouched default


def test_to_yaml_round_trip(tiny_yaml, tmp_path):
    cfg = tiny(tiny_yaml, "parallel.etp=1", "algorithm.name=gspo", "train.save_dir=${train.output_dir}/ck")
    assert cfg.train.save_dir == "runs/default/ck"  # interpolation resolved
    out = tmp_path / "sub" / "resolved.yaml"
    save_config(cfg, str(out))
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind
    again = load_config(str(out), [])
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(str(path), []) == RunConfig()


# ---------------------------------------------------------------- load errors

def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_wrong_type_names_field_type_and_value():
    message = load_error(None, ["parallel.tp=two"])
    assert message.startswith("parallel.tp: expected int, got 'two'")
    assert "override 'parallel.tp=two'" in message


@pytest.mark.parametrize("override, expected", [
    ("parallel.etp=1.5", "parallel.etp: expected int or null, got 1.5"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel: expected bool, got 'maybe'"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("train.lora.targets=5", "train.lora.targets: expected a list of str, got 5"),
    ("parallel.tp=null", "parallel.tp: expected int, got None"),
    ("optim=5", "optim: expected a mapping (a config section), got 5"),
    ("train.lora=null", "train.lora: expected a mapping (a config section), got None"),
])
def test_wrong_types(override, expected):
    assert load_error(None, [override]).startswith(expected)


@pytest.mark.parametrize("override, field, allowed", [
    ("data.truncation=middle", "data.truncation", "'left', 'right', 'error'"),
    ("data.source=csv", "data.source", "'jsonl', 'parquet', 'hf', 'synthetic'"),
    ("model.dtype=fp8", "model.dtype", "'auto', 'fp32', 'bf16', 'fp16'"),
    ("algorithm.gspo.loss_mode=ppo", "algorithm.gspo.loss_mode", "'gspo', 'gspo_token', 'grpo'"),
    ("parallel.backend=mpi", "parallel.backend", "'auto', 'nccl', 'gloo'"),
    ("train.loss=fused", "train.loss", "'plain', 'chunked'"),
])
def test_choice_fields_name_allowed_values(override, field, allowed):
    message = load_error(None, [override])
    assert message.startswith(f"{field}: expected one of {allowed}, got")


def test_unknown_key_in_override_suggests_close_names():
    message = load_error(None, ["optim.lrr=1"])
    assert message.startswith("unknown key 'optim.lrr'") and "'lr'" in message


def test_unknown_keys_in_file_name_the_file(tmp_path):
    path = tmp_path / "bad_key.yaml"
    path.write_text("train:\n  lora:\n    rnak: 4\n")
    message = load_error(str(path), [])
    assert "unknown key 'train.lora.rnak'" in message and str(path) in message
    path.write_text("optimizer:\n  lr: 1\n")
    assert "unknown key 'optimizer'" in load_error(str(path), [])


def test_wrong_type_in_file_names_field_and_file(tmp_path):
    path = tmp_path / "bad_type.yaml"
    path.write_text("train:\n  micro_batch_size: [1, 2]\n")
    message = load_error(str(path), [])
    assert message.startswith("train.micro_batch_size: expected int") and str(path) in message


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    assert load_error(str(path), []) == f"config file not found: {path}"


@pytest.mark.parametrize("text, expected", [
    ("model: [1,\nparallel: 2\n", "malformed YAML"),
    ("parallel:\n  tp: 2\n  tp: 3\n", "duplicate key"),
    ("- 1\n- 2\n", "top level must be a mapping"),
])
def test_malformed_file_names_path(tmp_path, text, expected):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    message = load_error(str(path), [])
    assert message.startswith(str(path)) and expected in message


@pytest.mark.parametrize("override", ["parallel.tp", "=3"])
def test_override_without_equals(override):
    assert f"override '{override}' must look like section.field=value" in load_error(None, [override])


def test_malformed_override_value():
    message = load_error(None, ["generation.stop=[a, b"])
    assert message.startswith("override 'generation.stop=[a, b'")


def test_broken_interpolation_names_field():
    assert load_error(None, ["model.hf_dir=${nowhere}"]).startswith("model.hf_dir:")


# ---------------------------------------------------------------- validate

def test_tiny_config_is_valid(tiny_yaml):
    validate(tiny(tiny_yaml), world_size=2)
    validate(tiny(tiny_yaml, "parallel.pp=2"), world_size=8)


def test_heads_not_divisible_by_tp_names_allowed(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "parallel.tp=3"), world_size=3)
    assert "parallel.tp=3 does not divide model.num_attention_heads=8 (allowed: 1, 2, 4, 8)" in message
    assert "parallel.tp=3 does not divide model.num_query_groups=2 (allowed: 1, 2)" in message
    assert "; " in message  # every problem reported at once


def test_world_size_not_divisible(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "parallel.pp=2"), world_size=6)
    assert "parallel.tp*pp*cp (2*2*1)=4 does not divide world_size=6 (allowed: 1, 2, 3, 6)" in message


def test_layers_not_divisible_by_pp(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "parallel.tp=1", "parallel.pp=3"), world_size=3)
    assert "parallel.pp=3 does not divide model.num_layers=4 (allowed: 1, 2, 4)" in message


def test_vpp_rules(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "parallel.vpp=2"), world_size=2)
    assert "parallel.vpp=2 needs parallel.pp > 1" in message
    validate(tiny(tiny_yaml, "parallel.pp=2", "parallel.vpp=2"), world_size=4)
    message = validate_error(tiny(tiny_yaml, "parallel.pp=2", "parallel.vpp=3"), world_size=4)
    assert "parallel.vpp=3 does not divide layers per pipeline stage (model.num_layers/pp)=2" in message


def test_expert_parallel_rules(tiny_yaml):
    dense = validate_error(tiny(tiny_yaml, "parallel.ep=2"), world_size=4)
    assert "parallel.ep=2 needs a MoE model" in dense
    validate(tiny(tiny_yaml, "parallel.ep=2", "model.num_experts=4"), world_size=4)
    message = validate_error(tiny(tiny_yaml, "parallel.ep=3", "model.num_experts=4"), world_size=6)
    assert "parallel.ep=3 does not divide model.num_experts=4 (allowed: 1, 2, 4)" in message
    assert "parallel.etp*ep*pp (2*3*1)=6" not in message  # 6 divides 6
    message = validate_error(tiny(tiny_yaml, "parallel.ep=2", "model.num_experts=4"), world_size=2)
    assert "parallel.etp*ep*pp (2*2*1)=4 does not divide world_size=2" in message


def test_cuda_graph_rules(tiny_yaml, monkeypatch):
    """generation.cuda_graphs: refilled generation of a dense model on one pipeline stage; the device
    is checked on the real launch only (a recipe may be printed on a machine without the GPU)."""
    import torch

    assert RunConfig().generation.continuous_batching and not RunConfig().generation.cuda_graphs
    on = "generation.cuda_graphs=true"
    validate(tiny(tiny_yaml, on), world_size=2)
    message = validate_error(tiny(tiny_yaml, on, "generation.continuous_batching=false", "parallel.pp=2",
                                  "model.num_experts=4"), world_size=4)
    for part in ("generation.cuda_graphs=true needs generation.continuous_batching=true",
                 "generation.cuda_graphs=true needs parallel.pp=1 (got 2", "needs a dense model"):
        assert part in message, (part, message)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^generation.cuda_graphs=true needs a CUDA device .*set it false$"):
        validate(tiny(tiny_yaml, on), world_size=2, launched=True)
    validate(tiny(tiny_yaml, "generation.continuous_batching=false"), world_size=2, launched=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(tiny(tiny_yaml, on), world_size=2, launched=True)


def test_nonpositive_parallel_size(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "parallel.cp=0"), world_size=2)
    assert "parallel.cp=0 must be >= 1" in message


def test_sequence_parallel_at_tp1_is_ignored_with_a_warning(tiny_yaml, caplog):
    cfg = tiny(tiny_yaml, "parallel.tp=1", "parallel.sequence_parallel=true")
    with caplog.at_level(logging.WARNING, logger="megagsm"):
        validate(cfg, world_size=1)
    assert cfg.parallel.sequence_parallel_active is False
    assert "parallel.sequence_parallel=true is ignored at parallel.tp=1" in caplog.text
    assert tiny(tiny_yaml, "parallel.sequence_parallel=true").parallel.sequence_parallel_active is True


def test_sft_global_batch_must_split_into_micro_batches(tiny_yaml):
    cfg = tiny(tiny_yaml, "parallel.tp=1", "train.global_batch_size=6", "train.micro_batch_size=2")
    validate(cfg, world_size=3)
    message = validate_error(cfg, world_size=2)
    assert ("train.global_batch_size=6 is not a multiple of train.micro_batch_size*dp=4 "
            "(micro_batch_size=2, dp=2) (allowed: 4, 8, 12, ...)") in message


def test_gspo_token_budget_must_hold_the_longest_sequence(tiny_yaml):
    base = ["algorithm.name=gspo", "parallel.tp=1", "data.max_prompt_len=100", "generation.max_new_tokens=128"]
    for ok in ("0", "227", "4096", "null"):
        validate(tiny(tiny_yaml, *base, f"train.max_tokens_per_microbatch={ok}"), world_size=1)
    for bad in ("226", "-1"):
        message = validate_error(tiny(tiny_yaml, *base, f"train.max_tokens_per_microbatch={bad}"), world_size=1)
        assert (f"train.max_tokens_per_microbatch={bad} is smaller than the longest sequence "
                "(data.max_prompt_len+generation.max_new_tokens-1=227)") in message
    # SFT does not read it
    validate(tiny(tiny_yaml, "parallel.tp=1", "train.max_tokens_per_microbatch=5"), world_size=1)


def test_shared_prompts_true_needs_packing_and_no_routing_replay(tiny_yaml):
    base = ["algorithm.name=gspo", "parallel.tp=1"]
    for ok in ("null", "true", "false"):
        validate(tiny(tiny_yaml, *base, f"train.share_prompts={ok}"), world_size=1)
    validate(tiny(tiny_yaml, *base, "train.share_prompts=null", "train.max_tokens_per_microbatch=0"), world_size=1)
    message = validate_error(tiny(tiny_yaml, *base, "train.share_prompts=true", "train.max_tokens_per_microbatch=0"),
                             world_size=1)
    assert "train.share_prompts=true needs packed microbatches: train.max_tokens_per_microbatch=0" in message
    message = validate_error(tiny(tiny_yaml, *base, "train.share_prompts=true", "algorithm.gspo.routing_replay=r3"),
                             world_size=1)
    assert "train.share_prompts=true: routing replay (algorithm.gspo.routing_replay=r3)" in message


def test_gspo_rollouts_must_split_into_mini_and_micro_batches(tiny_yaml):
    base = ["algorithm.name=gspo", "parallel.tp=1", "generation.max_new_tokens=128"]
    validate(tiny(tiny_yaml, *base, "algorithm.gspo.n_rollouts=4", "algorithm.gspo.prompts_per_step=2",
                  "algorithm.gspo.mini_batches=2", "train.global_batch_size=3"), world_size=2)
    message = validate_error(tiny(tiny_yaml, *base, "algorithm.gspo.mini_batches=3"), world_size=1)
    assert "algorithm.gspo.mini_batches=3 does not divide n_rollouts*prompts_per_step=64" in message
    message = validate_error(tiny(tiny_yaml, *base, "algorithm.gspo.n_rollouts=3",
                                  "algorithm.gspo.prompts_per_step=1"), world_size=2)
    assert "(n_rollouts*prompts_per_step/mini_batches=3) is not a multiple of train.micro_batch_size*dp=2" in message
    message = validate_error(tiny(tiny_yaml, *base, "algorithm.gspo.n_rollouts=1"), world_size=1)
    assert "algorithm.gspo.n_rollouts=1 is out of range (allowed: >= 2" in message


def test_model_source_rules(tiny_yaml):
    assert "model.hf_dir must be set when model.init='hf'" in validate_error(load_config(None, []), 1)
    message = validate_error(tiny(tiny_yaml, "model.init=hf", "model.hf_dir=/x"), 2)
    assert "model.hidden_size=64 is set but model.init='hf'" in message
    message = validate_error(tiny(tiny_yaml, "model.vocab_size=null", "model.family=null"), 2)
    assert "model.vocab_size must be set when model.init='random'" in message
    assert "model.family must be set" in message
    # random weights shaped by an HF config need no explicit sizes
    validate(load_config(None, ["model.init=random", "model.hf_dir=/some/hf"]), 1)


def test_data_rules(tiny_yaml):
    message = validate_error(tiny(tiny_yaml, "data.source=jsonl"), 2)
    assert "data.train_path must be set when data.source='jsonl'" in message
    message = validate_error(tiny(tiny_yaml, "data.max_prompt_len=400"), 2)
    assert "data.max_prompt_len+max_response_len=656 exceeds data.seq_length=512" in message
    message = validate_error(tiny(tiny_yaml, "model.max_position_embeddings=256"), 2)
    assert "data.seq_length=512 exceeds model.max_position_embeddings=256" in message
    message = validate_error(tiny(tiny_yaml, "parallel.tp=1", "parallel.cp=2", "data.seq_length=510",
                                  "data.max_prompt_len=200", "data.max_response_len=200"), 2)
    assert "data.seq_length=510 must be a multiple of 2*parallel.cp=4" in message
    message = validate_error(tiny(tiny_yaml, "parallel.tp=1", "parallel.cp=2", "data.pack_sequences=true"), 2)
    assert "data.pack_sequences=true needs parallel.cp=1 (got 2)" in message
    validate(tiny(tiny_yaml, "parallel.tp=1", "data.pack_sequences=true"), 2)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1", "optim.lr=-1.0 is out of range (allowed: >= 0)"),
    ("optim.min_lr=1.0", "optim.min_lr=1.0 is out of range (allowed: 0 <= min_lr <= optim.lr=1e-05)"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2=1.0 is out of range (allowed: [0, 1))"),
    ("generation.top_p=0", "generation.top_p=0.0 is out of range (allowed: (0, 1])"),
    ("train.lora.rank=0", "train.lora.rank=0 is out of range (allowed: >= 1)"),
    ("train.resume=/no/such/ckpt", "train.resume='/no/such/ckpt' is out of range (allowed: 'auto', 'none'"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 is out of range (allowed: >= 1)"),
])
def test_range_checks(tiny_yaml, override, expected):
    assert expected in validate_error(tiny(tiny_yaml, override), world_size=2)


def test_lora_fields_unchecked_when_disabled(tiny_yaml):
    validate(tiny(tiny_yaml, "train.lora.enabled=false", "train.lora.rank=0"), world_size=2)


# ---------------------------------------------------------------- layout property

def layout_ok(world, tp, pp, cp, ep, etp, layers, heads, groups, experts) -> bool:
    """megatron's rules, written independently of the code under test."""
    etp_eff = tp if etp is None else etp
    return (world % (tp * pp * cp) == 0 and world % (etp_eff * ep * pp) == 0
            and heads % tp == 0 and groups % tp == 0 and heads % groups == 0
            and layers % pp == 0
            and (experts % ep == 0 if experts is not None else ep == 1))


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 16), tp=st.integers(1, 8), pp=st.integers(1, 4), cp=st.integers(1, 4),
       ep=st.integers(1, 4), etp=st.none() | st.integers(1, 4), layers=st.integers(1, 12),
       heads=st.integers(1, 16), groups=st.none() | st.integers(1, 16),
       experts=st.none() | st.integers(1, 8))
def test_validate_model_layout_accepts_exactly_divisible_layouts(world, tp, pp, cp, ep, etp, layers, heads,
                                                                 groups, experts):
    parallel = ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
    expected = layout_ok(world, tp, pp, cp, ep, etp, layers, heads, heads if groups is None else groups, experts)
    try:
        validate_model_layout(layers, heads, groups, experts, parallel, world)
        accepted = True
    except ConfigError as e:
        accepted = False
        assert "\n" not in str(e) and ("parallel." in str(e) or "model." in str(e))
    assert accepted == expected


def test_validate_model_layout_skips_unknown_sizes():
    validate_model_layout(None, None, None, None, ParallelConfig(tp=3), world_size=3)
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.ffn_hidden_size=128"):
        validate_model_layout(None, None, None, None, ParallelConfig(tp=3), 3, ffn_hidden_size=128)


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(1) == [1] and divisors(0) == []


def test_moe_training_knobs_are_validated_before_launch():
    from megagsm.config import ConfigError, load_config, validate

    cfg = load_config(None, ["model.init=random", "model.family=qwen2", "model.hidden_size=64",
                             "model.num_layers=2", "model.num_attention_heads=4",
                             "model.ffn_hidden_size=128", "model.vocab_size=128",
                             "model.moe.load_balancing=aux_loss"])
    with pytest.raises(ConfigError, match=r"model\.moe\.load_balancing='aux_loss' needs aux_loss_coeff"):
        validate(cfg, 1)


def test_synthetic_difficulty_range_matches_the_generator():
    from megagsm.config import ConfigError, load_config, validate
    from megagsm.config.validate import SYNTHETIC_LEVELS
    from megagsm.data.synthetic import LEVELS

    assert SYNTHETIC_LEVELS == len(LEVELS)
    base = ["model.init=random", "model.family=qwen2", "model.hidden_size=64", "model.num_layers=2",
            "model.num_attention_heads=4", "model.ffn_hidden_size=128", "model.vocab_size=128"]
    validate(load_config(None, base + ["data.difficulty=0"]), 1)
    with pytest.raises(ConfigError, match=r"data\.difficulty.*0 to 4"):
        validate(load_config(None, base + [f"data.difficulty={len(LEVELS)}"]), 1)
