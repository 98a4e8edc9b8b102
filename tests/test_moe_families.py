"""Mixture-of-experts families end to end on tiny random fp32 models (8 experts, top-k 2 or 4):
Qwen3-MoE, Qwen2-MoE (shared expert), DeepSeek V3 (MLA with q LoRA, YaRN, groups, expert bias) and
DeepSeek V2-Lite (MLA without q LoRA).

One 2-rank launch does everything: `checkpoints_tools hf-to-mcore --ep 2` (each rank reading only its
experts), the checkpoint loaded at EP=2, EP=1, TP=2, TP=2 with EP=2 and PP=2 (logits vs transformers),
megatron's own save of the live EP=2 model, `checkpoints_tools verify --ep 2`, a grouped-GEMM expert
layout loading the same checkpoint, and the layout-parity harness (3 training steps at EP=1 and EP=2
from the converted weights). Exports back to HF run in the test process.
"""
from __future__ import annotations

import json
import shutil
import warnings
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from megagsm.testing.multirank import run_ranks
from megagsm.testing.tiny_moe import MOE_CASES, make_tiny_moe_model

VOCAB = 300
FP32_TOL = 1e-5
LOSS_RTOL = 1e-6     # as tests/test_parity.py
PARAM_ATOL = 1e-5
PARITY_CASES = ("qwen3_moe", "deepseek_v3")
MTP_TENSOR = "model.layers.2.enorm.weight"   # deepseek_v3 has 2 layers: a stray MTP layer's tensor


def _tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _hf_tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tokens = _tokens()
    refs = {}
    for name in MOE_CASES:
        model = make_tiny_moe_model(name, root / name)
        with torch.no_grad():
            refs[name] = model(tokens).logits.float()
    # a DeepSeek checkpoint with multi-token-prediction weights past the last layer
    path = root / "deepseek_v3" / "model.safetensors"
    tensors = load_file(path)
    tensors[MTP_TENSOR] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    results = run_ranks(_in_ranks, 2, str(root), tokens)
    return root, refs, results


def _factory(ckpt, spec, parallel):
    """Parity-harness model factory: the converted checkpoint at this layout."""
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config

    chunks = build_model_from_hf_config(load_hf_config(ckpt), parallel)
    load_mcore_checkpoint(chunks, ckpt)
    return chunks


def _in_ranks(root, tokens):
    import contextlib
    import io

    from checkpoints_tools import cli
    from megagsm.checkpoint.safetensors_io import SafetensorsDir
    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.forward import forward_logits
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint, save_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict
    from megagsm.testing.parity import ParityData, TinyGPTSpec, train_layouts

    ep2 = ParallelConfig(ep=2)
    layouts = {"ep1": ParallelConfig(), "tp2": ParallelConfig(tp=2),
               # attention split over TP=2 while experts split over EP=2 (expert TP 1)
               "tp2_ep2": ParallelConfig(tp=2, ep=2, etp=1), "pp2": ParallelConfig(pp=2)}
    out = {}
    real_read = SafetensorsDir.read
    for name in MOE_CASES:
        hf, ckpt = f"{root}/{name}", f"{root}/{name}.mcore"
        res = out[name] = {"logits": {}}
        # `python -m checkpoints_tools hf-to-mcore --ep 2`, recording what this rank reads
        read = []
        SafetensorsDir.read = lambda self, n, *a, **k: (read.append(n), real_read(self, n, *a, **k))[1]
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            res["convert_code"] = cli.main(["hf-to-mcore", "--hf-dir", hf, "--out", ckpt, "--ep", "2",
                                            "--no-progress"], keep_process_group=True)
        SafetensorsDir.read = real_read
        res["read"] = sorted(set(read))
        res["warnings"] = [str(w.message) for w in caught]
        init_runtime(ep2)
        chunks = build_model_from_hf_config(load_hf_config(ckpt), ep2)
        load_mcore_checkpoint(chunks, ckpt)
        res["logits"]["ep2"] = forward_logits(chunks, tokens, VOCAB)
        res["state_ep2"] = gather_full_state_dict(chunks)
        # megatron's own save of the live EP=2 model
        save_mcore_checkpoint(chunks, f"{root}/{name}.saved", hf_files_from=ckpt)
        for layout, parallel in layouts.items():
            if parallel.pp > 1 and load_hf_config(ckpt)["num_hidden_layers"] % parallel.pp:
                continue
            init_runtime(parallel)
            chunks = build_model_from_hf_config(load_hf_config(ckpt), parallel)
            load_mcore_checkpoint(chunks, ckpt)
            res["logits"][layout] = forward_logits(chunks, tokens, VOCAB)

    # grouped-GEMM experts (megatron's GroupedMLP; its kernel needs a GPU package, building does not)
    from megatron.core.transformer.moe import grouped_gemm_util

    init_runtime(ep2)
    available = grouped_gemm_util.grouped_gemm_is_available
    grouped_gemm_util.grouped_gemm_is_available = lambda: True
    try:
        ckpt = f"{root}/qwen3_moe.mcore"
        chunks = build_model_from_hf_config(load_hf_config(ckpt), ep2, moe_grouped_gemm=True,
                                            moe_use_legacy_grouped_gemm=True)
    finally:
        grouped_gemm_util.grouped_gemm_is_available = available
    out["grouped_class"] = type(chunks[0].decoder.layers[0].mlp.experts).__name__
    load_mcore_checkpoint(chunks, ckpt)
    out["grouped_state"] = gather_full_state_dict(chunks)

    # the CLI's verify at EP=2, as torchrun would run it on each rank
    for name in PARITY_CASES:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli.main(["verify", "--hf-dir", f"{root}/{name}", "--mcore-dir", f"{root}/{name}.mcore",
                             "--ep", "2"], keep_process_group=True)
        out[f"cli_{name}"] = {"code": code, "stdout": stdout.getvalue()}

    # layout parity: the same 3 training steps at EP=1 (DP=2) and EP=2 from the converted weights
    spec, data = TinyGPTSpec(vocab_size=VOCAB, seq_length=16), ParityData()
    for name in PARITY_CASES:
        factory = partial(_factory, f"{root}/{name}.mcore")
        ep1 = train_layouts(spec, data, {"ep1": ParallelConfig(use_distributed_optimizer=False)}, None,
                            factory)["ep1"]
        ep2_run = train_layouts(spec, data, {"ep2": ParallelConfig(ep=2, use_distributed_optimizer=False)},
                                ep1["init"], factory)["ep2"]
        out[f"parity_{name}"] = {"ep1": ep1, "ep2": ep2_run}
    return out


def _expert_of(name):
    parts = name.split(".")
    return int(parts[parts.index("experts") + 1]) if ".mlp.experts." in name else None


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_logits_match_transformers_at_every_layout(moe_run, name):
    _, refs, results = moe_run
    assert all(r[name]["convert_code"] == 0 for r in results)
    for rank_result in results:
        logits = rank_result[name]["logits"]
        assert set(logits) >= {"ep2", "ep1", "tp2", "tp2_ep2"} and ("pp2" in logits) == (name != "qwen2_moe")
        for layout, got in logits.items():
            diff = (got - refs[name]).abs().max().item()
            assert diff < FP32_TOL, f"{name} {layout}: max |logit diff| {diff}"
            # the layouts agree with each other to fp32 rounding (reduction order only)
            spread = (got - logits["ep2"]).abs().max().item()
            assert spread < 1e-6, f"{name} {layout} vs ep2: {spread}"


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_each_ep_rank_reads_only_its_experts(moe_run, name):
    root, _, results = moe_run
    r0, r1 = (set(r[name]["read"]) for r in results)
    on_disk = set(_hf_tensors(root / name)) - {MTP_TENSOR}
    assert r0 | r1 == on_disk
    experts = {n for n in on_disk if _expert_of(n) is not None}
    assert experts and not (r0 & r1 & experts)
    assert {_expert_of(n) for n in r0 & experts} == {0, 1, 2, 3}
    assert {_expert_of(n) for n in r1 & experts} == {4, 5, 6, 7}


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_export_is_bit_exact_with_hub_expert_keys(moe_run, name):
    from transformers import AutoModelForCausalLM

    from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

    root, refs, _ = moe_run
    original = _hf_tensors(root / name)
    original.pop(MTP_TENSOR, None)
    for source in ("mcore", "saved"):   # written by hf-to-mcore / by megatron, both at EP=2
        back = root / f"{name}.{source}.back"
        shutil.rmtree(back, ignore_errors=True)
        convert_mcore_to_hf(root / f"{name}.{source}", back, max_shard_bytes=200_000, progress=False)
        exported = _hf_tensors(back)
        assert sorted(exported) == sorted(original), f"{source}: keys differ"
        for key in original:
            assert original[key].dtype == exported[key].dtype, key
            assert torch.equal(original[key], exported[key]), f"{source}: {key}"
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in exported   # the Hub's per-expert layout
    reloaded = AutoModelForCausalLM.from_pretrained(str(back))
    with torch.no_grad():
        assert torch.equal(reloaded(_tokens()).logits, refs[name])


@pytest.mark.multirank
def test_bf16_export_keeps_routing_bias_fp32(moe_run):
    from megagsm.checkpoint.mcore_to_hf import convert_mcore_to_hf

    root, _, _ = moe_run
    back = root / "deepseek_v3.bf16"
    convert_mcore_to_hf(root / "deepseek_v3.mcore", back, dtype="bfloat16", progress=False)
    exported = _hf_tensors(back)
    # transformers keeps DeepSeek's router weight and bias in fp32 (_keep_in_fp32_modules_strict)
    assert exported["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert exported["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert exported["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16
    assert exported["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.multirank
def test_mtp_layers_are_skipped_with_a_warning(moe_run):
    _, _, results = moe_run
    messages = results[0]["deepseek_v3"]["warnings"]
    assert any("model.layers.2.enorm.weight" in m and "multi-token-prediction" in m for m in messages), messages
    assert not any("multi-token" in m for m in results[0]["qwen3_moe"]["warnings"])


@pytest.mark.multirank
def test_grouped_gemm_layout_loads_the_same_checkpoint(moe_run):
    _, _, results = moe_run
    r0 = results[0]
    assert r0["grouped_class"] == "GroupedMLP"
    sequential, grouped = r0["qwen3_moe"]["state_ep2"], r0["grouped_state"]
    assert sorted(sequential) == sorted(grouped)
    assert all(torch.equal(sequential[k], grouped[k]) for k in sequential)


@pytest.mark.multirank
@pytest.mark.parametrize("name", PARITY_CASES)
def test_verify_cli_passes_at_ep2(moe_run, name):
    _, _, results = moe_run
    for rank_result in results:
        assert rank_result[f"cli_{name}"]["code"] == 0, rank_result[f"cli_{name}"]
    report = json.loads(results[0][f"cli_{name}"]["stdout"].strip().splitlines()[-1])
    assert report["ok"] and report["layout"]["ep"] == 2 and report["argmax_match"] == 1.0
    assert report["max_abs_logit_diff"] < FP32_TOL


@pytest.mark.multirank
@pytest.mark.parametrize("name", PARITY_CASES)
def test_training_matches_at_ep1_and_ep2(moe_run, name):
    from megagsm.testing.parity import max_param_diff

    _, _, results = moe_run
    run = results[0][f"parity_{name}"]
    ep1, ep2 = run["ep1"], run["ep2"]
    moved = max_param_diff(ep1["init"], ep1["final"])[0]
    assert moved > 1e-3, moved    # training moved the weights: equal results are not trivial
    for step, (a, b) in enumerate(zip(ep1["losses"], ep2["losses"])):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}: {b} vs {a}"
    diff, key = max_param_diff(ep1["final"], ep2["final"])
    assert diff < PARAM_ATOL, f"{key} differs by {diff:.3g}"
