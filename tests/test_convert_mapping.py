"""The mapping data and its pieces, in one process without a runtime: transforms, config translation,
layout checks, vocab padding, the registry, streaming safetensors IO and atomic output dirs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from megagsm.config.parallel import ParallelConfig
from megagsm.models.errors import ModelInputError
from megagsm.models.mapping import Dims, Segment, WeightRule, fuse, pieces, split
from megagsm.models.provider import padded_vocab_size, provider_for
from megagsm.models.registry import FAMILIES, family_for, known_model_types


def _rows(n, width=3, start=0):
    """A tensor whose row i holds the value start + i: layouts become readable."""
    return (torch.arange(start, start + n, dtype=torch.float32)[:, None]).repeat(1, width)


def test_qkv_rows_are_grouped_per_kv_group():
    dims = Dims(num_attention_heads=4, num_query_groups=2, kv_channels=2)
    rule = WeightRule("qkv", ("q", "k", "v"), "qkv", ("layer",))
    q, k, v = _rows(8, start=0), _rows(4, start=100), _rows(4, start=200)
    fused = fuse(rule, [q, k, v], dims)
    # group 0: query heads 0-1 (q rows 0-3), key head 0, value head 0; then group 1
    assert fused[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    back = split(rule, fused, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), d=st.integers(1, 5), bias=st.booleans())
def test_qkv_round_trip(groups, per_group, d, bias):
    dims = Dims(groups * per_group, groups, d)
    rule = WeightRule("qkv", ("q", "k", "v"), "qkv")
    tail = () if bias else (3,)
    q, k, v = (torch.randn(n * d, *tail) for n in (groups * per_group, groups, groups))
    fused = fuse(rule, [q, k, v], dims)
    assert fused.shape[0] == (groups * per_group + 2 * groups) * d
    assert rule.kind.hf_shapes(tuple(fused.shape), dims) == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]
    assert all(torch.equal(a, b) for a, b in zip(split(rule, fused, dims), [q, k, v]))


def test_gate_up_is_gate_then_up():
    rule = WeightRule("fc1", ("gate", "up"), "gate_up")
    gate, up = _rows(3), _rows(3, start=10)
    fused = fuse(rule, [gate, up], Dims(1, 1, 1))
    assert fused[:, 0].tolist() == [0, 1, 2, 10, 11, 12]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6), data=st.data())
def test_pieces_cover_any_row_range(sizes, data):
    sources = [torch.randn(s + 2, 2) for s in sizes]
    segments = [Segment(i, 1, s) for i, s in enumerate(sizes)]
    fused = torch.cat([sources[s.source][s.start:s.start + s.rows] for s in segments])
    start = data.draw(st.integers(0, fused.shape[0] - 1))
    stop = data.draw(st.integers(start + 1, fused.shape[0]))
    out = torch.empty(stop - start, 2)
    for src, a, b, dst in pieces(segments, start, stop):
        out[dst:dst + b - a] = sources[src][a:b]
    assert torch.equal(out, fused[start:stop])


def test_registry_lists_and_loads_every_family():
    assert known_model_types() == sorted(FAMILIES) == ["deepseek_v2", "deepseek_v3", "gemma", "llama", "qwen2",
                                                       "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss"]
    for model_type in FAMILIES:
        assert family_for(model_type).model_type == model_type
    with pytest.raises(ModelInputError, match="known: deepseek_v2, deepseek_v3, gemma, llama, qwen2, qwen2_moe"):
        family_for("gpt2")


def _cfg(model_type, **fields):
    base = dict(model_type=model_type, vocab_size=1000, hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=4096)
    return {**base, **fields}


def test_config_translation_per_family():
    # deepseek-coder-6.7b style (transformers 4 layout): linear rope scaling, theta 1e5
    p = provider_for(_cfg("llama", rope_theta=100000, rope_scaling={"type": "linear", "factor": 4.0}))
    assert p.settings.arch.seq_len_interpolation_factor == 4.0 and p.settings.arch.rotary_base == 100000
    assert p.settings.config["activation_func"] is F.silu and not p.settings.config["add_qkv_bias"]
    # the same in the transformers 5 layout
    p5 = provider_for(_cfg("llama", rope_parameters={"rope_theta": 1e5, "rope_type": "linear", "factor": 4.0}))
    assert p5.settings.arch == p.settings.arch
    llama3 = provider_for(_cfg("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1,
                                                      "high_freq_factor": 4, "original_max_position_embeddings": 8192}))
    assert llama3.settings.arch.rope_scaling and llama3.settings.arch.rope_scaling_factor == 8.0
    with pytest.raises(ModelInputError, match="'yarn' is not supported"):
        provider_for(_cfg("llama", rope_scaling={"type": "yarn", "factor": 4.0}))
    with pytest.raises(ModelInputError, match="attention_bias=True with mlp_bias=False"):
        provider_for(_cfg("llama", attention_bias=True))

    qwen2 = provider_for(_cfg("qwen2", tie_word_embeddings=True))
    assert qwen2.settings.config["add_qkv_bias"] and qwen2.settings.arch.share_embeddings_and_output_weights
    mcore_keys = {r.mcore for r in qwen2.weight_map.rules}
    assert "output_layer.weight" not in mcore_keys and "decoder.layers.self_attention.linear_qkv.bias" in mcore_keys
    assert qwen2.weight_map.tied_hf == {"lm_head.weight": "model.embed_tokens.weight"}
    with pytest.raises(ModelInputError, match="use_sliding_window=True"):
        provider_for(_cfg("qwen2", use_sliding_window=True))

    qwen3 = provider_for(_cfg("qwen3", head_dim=32))
    assert qwen3.settings.config["qk_layernorm"] and qwen3.settings.config["kv_channels"] == 32

    seed = provider_for(_cfg("seed_oss", head_dim=128, attention_bias=True, attention_out_bias=False))
    assert seed.settings.config["kv_channels"] == 128 and seed.settings.config["add_qkv_bias"]
    assert not seed.settings.config["add_bias_linear"]

    gemma = provider_for(_cfg("gemma", head_dim=256, hidden_act="gelu"))  # legacy value = tanh GELU
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(gemma.settings.config["activation_func"](x), F.gelu(x, approximate="tanh"))
    assert gemma.settings.config["layernorm_zero_centered_gamma"]
    assert gemma.settings.arch.share_embeddings_and_output_weights  # Gemma ties by default
    assert gemma.family.post_build is not None
    with pytest.raises(ModelInputError, match="hidden_act='relu'"):
        provider_for(_cfg("qwen2", hidden_act="relu"))
    with pytest.raises(ModelInputError, match="'hidden_size' is required"):
        provider_for({k: v for k, v in _cfg("qwen2").items() if k != "hidden_size"})


def test_layout_checks_name_the_field():
    p = provider_for(_cfg("qwen2", num_attention_heads=6, num_key_value_heads=3, intermediate_size=100,
                          num_hidden_layers=3))
    for parallel, message in [
        (ParallelConfig(tp=4), "num_attention_heads=6 is not divisible by tp=4"),
        (ParallelConfig(tp=2), "num_key_value_heads=3 is not divisible by tp=2"),
        (ParallelConfig(tp=3, pp=3), "intermediate_size=100 is not divisible by tp=3"),
        (ParallelConfig(pp=2), "num_hidden_layers=3 is not divisible by pp"),
        (ParallelConfig(ep=2), "ep=2 but model_type 'qwen2' has no experts"),
    ]:
        with pytest.raises(ModelInputError, match=message):
            p.check_layout(parallel)
    p.check_layout(ParallelConfig(tp=1, pp=3))


def test_vocab_padding_follows_megatron():
    assert padded_vocab_size(151936, 1) == 151936 and padded_vocab_size(151936, 2) == 152064
    assert padded_vocab_size(300, 1) == 384 and padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(256000, 8) == 256000


def test_streaming_safetensors_writer_and_reader(tmp_path):
    from megagsm.checkpoint.safetensors_io import SafetensorsDir, ShardedSafetensorsWriter

    tensors = {f"t{i}": torch.randn(5 + i, 4).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=200)
    with pytest.raises(RuntimeError, match="expected t0"):
        writer.write("t1", tensors["t1"])
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.finish()
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors) and set(index["weight_map"].values()) == set(files)
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = SafetensorsDir(tmp_path)
    assert torch.equal(reader.read("t3", (1, 4), (1, 3)), tensors["t3"][1:4, 1:3])
    assert reader.info("t2").shape == (7, 4) and reader.info("t1").dtype == torch.bfloat16


def test_safetensors_dir_errors(tmp_path):
    from megagsm.checkpoint.safetensors_io import SafetensorsDir

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelInputError, match="no \\*.safetensors weight files .*pytorch_model.bin"):
        SafetensorsDir(tmp_path)
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelInputError, match="model-00002-of-00002.safetensors: missing"):
        SafetensorsDir(tmp_path)


def test_atomic_dir(tmp_path):
    from megagsm.utils.atomic import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise ValueError("boom")
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and len(list(tmp_path.iterdir())) == 1
