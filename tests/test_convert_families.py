"""Every dense family, end to end on tiny random fp32 models: HF -> megatron written at TP=2 on 2 ranks,
loaded at TP=2, TP=1 and PP=2 (logits vs transformers), exported back to HF bit-exactly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megagsm.testing.multirank import run_ranks
from megagsm.testing.tiny_hf import make_tiny_hf_model

# (case name, HF model_type, config overrides)
CASES = [
    ("qwen2", "qwen2", {}),
    ("qwen3", "qwen3", {}),
    ("llama", "llama", {}),             # deepseek-coder style rope_scaling linear x4
    ("gemma", "gemma", {}),             # tied, (1+w) norms, sqrt(hidden) embedding scale, GeGLU-tanh
    ("seed_oss", "seed_oss", {}),
    ("qwen2_tied", "qwen2", {"tie_word_embeddings": True}),  # Qwen2.5-0.5B..3B style
    ("llama3", "llama", {"rope_theta": 500000.0, "rope_scaling": {  # Llama-3.1 style rope
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}),
]
VOCAB = 300
FP32_TOL = 1e-5
ROPE_POSITIONS = 4096  # long enough for rope scaling to matter; logits at 12 tokens barely see it


def _sample_tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Builds the HF models, runs every conversion/load on 2 ranks in one launch."""
    root = tmp_path_factory.mktemp("families")
    tokens = _sample_tokens()
    refs, cases = {}, []
    for name, model_type, overrides in CASES:
        model = make_tiny_hf_model(model_type, root / name, **overrides)
        with torch.no_grad():
            refs[name] = model(tokens).logits.float()
            positions = torch.arange(ROPE_POSITIONS)[None]
            refs[f"{name}_rope_cos"] = model.model.rotary_emb(refs[name], positions)[0][0]
        cases.append((name, str(root / name), str(root / f"{name}.mcore"), str(root / f"{name}.saved")))
    results = run_ranks(_convert_and_load, 2, cases, tokens)
    return root, refs, cases, results


def _convert_and_load(cases, tokens):
    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.forward import forward_logits
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint, save_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config
    from megagsm.runtime import init_runtime

    out = {}
    for name, hf_dir, ckpt, saved in cases:
        logits = {}
        for layout, (tp, pp) in (("tp2", (2, 1)), ("tp1", (1, 1)), ("pp2", (1, 2))):
            parallel = ParallelConfig(tp=tp, pp=pp)
            init_runtime(parallel)
            if layout == "tp2":
                convert_hf_to_mcore(hf_dir, ckpt, parallel, progress=False)
            chunks = build_model_from_hf_config(load_hf_config(ckpt), parallel)
            load_mcore_checkpoint(chunks, ckpt)
            logits[layout] = forward_logits(chunks, tokens, VOCAB)
            if layout == "tp1":
                angles = chunks[0].rotary_pos_emb(ROPE_POSITIONS)  # [positions, 1, 1, head_dim]
                logits["rope_cos"] = torch.cos(angles.float()).reshape(ROPE_POSITIONS, -1)
            if layout == "tp2" and name == "qwen2_tied":
                # the trainers' path: megatron's own save of a live TP=2 model (padded vocab: 512 rows)
                save_mcore_checkpoint(chunks, saved, hf_files_from=ckpt)
            if layout == "pp2" and name == "qwen2_tied":
                chunks = build_model_from_hf_config(load_hf_config(saved), parallel)
                load_mcore_checkpoint(chunks, saved)
                logits["pp2_from_saved"] = forward_logits(chunks, tokens, VOCAB)
        out[name] = logits
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_logits_match_transformers_at_every_layout(converted, name):
    _, refs, _, results = converted
    for rank_result in results:
        got = rank_result[name]
        for layout in ("tp2", "tp1", "pp2"):
            diff = (got[layout] - refs[name]).abs().max().item()
            assert diff < FP32_TOL, f"{name} {layout}: max |logit diff| {diff}"
        # written at TP=2, loaded at TP=1 and PP=2: the same computation, so the same bits
        assert torch.equal(got["tp1"], got["pp2"])
        rope = (got["rope_cos"] - refs[f"{name}_rope_cos"]).abs().max().item()
        assert rope < 2e-3, f"{name}: rotary cos differs by {rope} over {ROPE_POSITIONS} positions"
    assert torch.equal(results[0][name]["tp2"], results[1][name]["tp2"])


@pytest.mark.multirank
def test_megatron_saved_checkpoint_loads_at_other_layout(converted):
    _, _, _, results = converted
    for rank_result in results:
        assert torch.equal(rank_result["qwen2_tied"]["pp2_from_saved"], rank_result["qwen2_tied"]["pp2"])


def _hf_tensors(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.multirank
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_round_trip_is_bit_exact(converted, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

    root, _, _, _ = converted
    back = root / f"{name}.back"
    # small shards: exercises the sharded layout + index on tiny models
    summary = convert_mcore_to_hf(root / f"{name}.mcore", back, max_shard_bytes=150_000, progress=False)
    assert len(summary["files"]) > 1 and (back / "model.safetensors.index.json").is_file()
    original, exported = _hf_tensors(root / name), _hf_tensors(back)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert original[key].dtype == exported[key].dtype, key
        assert torch.equal(original[key], exported[key]), key
    assert json.loads((back / "config.json").read_text()) == json.loads((root / name / "config.json").read_text())
    AutoTokenizer.from_pretrained(str(back))
    reloaded = AutoModelForCausalLM.from_pretrained(str(back))
    for key, value in reloaded.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key


@pytest.mark.multirank
def test_export_of_megatron_saved_checkpoint_strips_vocab_padding(converted):
    from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

    root, _, _, _ = converted
    back = root / "qwen2_tied.saved.back"
    convert_mcore_to_hf(root / "qwen2_tied.saved", back, progress=False)
    original, exported = _hf_tensors(root / "qwen2_tied"), _hf_tensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
