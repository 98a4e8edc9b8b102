"""megagsm.plan: its static bytes equal what megatron actually allocates for a built model after one
optimizer step (params, DDP grad buffers, optimizer state), at several layouts; every shipped GPU
recipe fits 80 GiB per the planner, and each recipe's header states the planner's figures."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megagsm.config.loader import load_config
from megagsm.testing.multirank import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPES = sorted(p for p in (ROOT / "launch" / "recipes").glob("*.yaml") if "cpu" not in p.name)

TINY_MOE = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, intermediate_size=96,
                moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                max_position_embeddings=256, mlp_only_layers=[0], tie_word_embeddings=False)


def _hf(model_type: str, **overrides) -> dict:
    if model_type == "qwen3_moe":
        return {**TINY_MOE, **overrides}
    from megagsm.testing.tiny_hf import tiny_config

    return {**tiny_config(model_type).to_dict(), **overrides}


def _run_config(hf_dir: str, parallel: dict, dtype: str = "fp32", lora: bool = False):
    overrides = ["model.init=random", f"model.hf_dir={hf_dir}", f"model.dtype={dtype}",
                 "train.micro_batch_size=2", "train.global_batch_size=2", "data.seq_length=16"]
    overrides += [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in parallel.items()]
    if lora:
        overrides += ["train.lora.enabled=true", "train.lora.rank=4"]
    return load_config(None, overrides)


def _counted_bytes(chunks, optimizer) -> dict:
    """Bytes of the tensors megatron holds, read off the objects themselves."""
    def storages(tensors):
        seen = {}
        for t in tensors:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return seen

    params = [p for c in chunks for p in c.parameters()]
    param_storages = storages(params)
    grads = storages([p.main_grad for p in params if getattr(p, "main_grad", None) is not None])
    opt = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in param_storages:   # an fp32 main copy
                    opt += p.numel() * p.element_size()
                state = torch_opt.state.get(p, {})
                opt += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
    return {"params": sum(param_storages.values()), "grads": sum(grads.values()), "optimizer": opt}


def _build_and_step(cases: list[dict], tmp: str) -> list[dict]:
    import torch
    from megatron.core import parallel_state as ps

    from megagsm.train.model import build_model
    from megagsm.models.training import build_optimizer, train_step, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.models.lora import apply_lora
    from megagsm.train.optim import optimizer_config

    out = []
    for i, case in enumerate(cases):
        hf_dir = Path(tmp) / f"case{i}"
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(json.dumps(case["hf"]))
        cfg = _run_config(str(hf_dir), case["parallel"], case.get("dtype", "fp32"), case.get("lora", False))
        info = init_runtime(cfg.parallel, seed=0)
        built = build_model(cfg.model, cfg.parallel, info.device)
        chunks = built.chunks
        if cfg.train.lora.enabled:
            chunks = apply_lora(chunks, cfg.train.lora, seed=0)
        chunks = wrap_ddp(chunks, cfg.parallel)
        optimizer = build_optimizer(chunks, optimizer_config(cfg.optim, cfg.parallel, built.dtype))
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 300, (2, 17), generator=g)
        batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                 "loss_mask": torch.ones(2, 16), "position_ids": torch.arange(16).expand(2, -1).contiguous()}
        train_step(chunks, optimizer, [batch], 1, 16, 2)
        counted = _counted_bytes(chunks, optimizer)
        counted.update(stage=ps.get_pipeline_model_parallel_rank(), case=i)
        out.append(counted)
    return out


def _check(cases, results_per_rank, world_size, tmp_path):
    from megagsm.plan import plan_memory

    for i, case in enumerate(cases):
        cfg = _run_config(str(tmp_path / f"case{i}"), case["parallel"], case.get("dtype", "fp32"), case.get("lora", False))
        plan = plan_memory(cfg, world_size, hf_config=case["hf"], source="test")
        for stage in plan.stages:
            ranks = [r[i] for r in results_per_rank if r[i]["stage"] == stage.stage]
            label = f"case {i} {case} stage {stage.stage}"
            assert {r["params"] for r in ranks} == {stage.params}, label
            assert {r["grads"] for r in ranks} == {stage.grads}, label
            # the planner reports the fullest DP rank's optimizer shard
            assert max(r["optimizer"] for r in ranks) == stage.optimizer, label


ONE_RANK = [
    {"hf": _hf("qwen2"), "parallel": {"use_distributed_optimizer": True}},
    {"hf": _hf("qwen2", tie_word_embeddings=True), "parallel": {"use_distributed_optimizer": False}},
    {"hf": _hf("qwen3_moe"), "parallel": {"use_distributed_optimizer": True}},
    {"hf": _hf("gemma"), "parallel": {"use_distributed_optimizer": True}, "lora": True},
    {"hf": _hf("seed_oss"), "parallel": {"use_distributed_optimizer": True}, "dtype": "bf16"},
]

TWO_RANKS = [
    {"hf": _hf("qwen2"), "parallel": {"tp": 2, "sequence_parallel": True}},
    {"hf": _hf("qwen2", tie_word_embeddings=True), "parallel": {"pp": 2}},
    {"hf": _hf("qwen2", tie_word_embeddings=True), "parallel": {"use_distributed_optimizer": True}},
    {"hf": _hf("qwen3_moe"), "parallel": {"ep": 2}},
    {"hf": _hf("qwen3"), "parallel": {"tp": 2}, "dtype": "bf16"},
]


def test_static_bytes_equal_a_built_model_one_rank(tmp_path):
    results = run_ranks(_build_and_step, 1, ONE_RANK, str(tmp_path))
    _check(ONE_RANK, results, 1, tmp_path)


@pytest.mark.multirank
def test_static_bytes_equal_a_built_model_two_ranks(tmp_path):
    results = run_ranks(_build_and_step, 2, TWO_RANKS, str(tmp_path))
    _check(TWO_RANKS, results, 2, tmp_path)


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_shipped_gpu_recipe_fits_80_gib_and_header_states_it(recipe):
    from megagsm.plan import plan_memory, resolve_world_size

    cfg = load_config(str(recipe))
    plan = plan_memory(cfg, resolve_world_size(cfg, str(recipe), None), 80.0)
    s = plan.summary()
    assert s["fits"], f"{recipe.name}: {s}"
    header = re.search(r"# planner \(python -m megagsm\.plan\), GiB per GPU of 80: static ([\d.]+), train peak "
                       r"([\d.]+), generate peak ([\d.]+) \(([\d.]+) with grads/optimizer released\)", recipe.read_text())
    assert header, f"{recipe.name}: header lacks the planner's figures"
    keys = ("static_gib", "train_peak_gib", "generate_peak_resident_gib", "generate_peak_released_gib")
    assert list(header.groups()) == [f"{s[k]:.1f}" for k in keys], recipe.name


def test_cli_prints_a_table_then_one_json_line(capsys):
    from megagsm.plan.__main__ import main

    assert main(["--config", str(ROOT / "launch/recipes/sft_qwen2.5_0.5b.yaml")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert {"static_gib", "train_peak_gib", "generate_peak_gib", "fits"} <= set(out)
    assert out["world_size"] == 8 and out["dp"] == 8
    assert any(l.startswith("= static") for l in lines[:-1])


def test_cli_world_size_contradicting_the_recipe_is_a_user_error():
    proc = subprocess.run([sys.executable, "-m", "megagsm.plan", "--config", "launch/recipes/sft_qwen2.5_0.5b.yaml",
                           "--world-size", "4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--world-size 4" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_qwen3_30b_ep8_static_matches_a_hand_count():
    """Qwen3-30B-A3B at TP2/EP8 (the issue's ~46 GiB): parameters per rank counted by hand from the
    published config: 16 local experts x 48 layers x 3 x 2048 x 768, attention split by TP2, vocab 151936
    padded to 152064 (a multiple of 256) and split by TP2, norms and routers whole."""
    from megagsm.plan import plan_memory, resolve_world_size

    recipe = ROOT / "launch/recipes/gspo_qwen3_30b_a3b_ep.yaml"
    cfg = load_config(str(recipe))
    plan = plan_memory(cfg, resolve_world_size(cfg, str(recipe), None))
    h, layers = 2048, 48
    experts = 16 * layers * 3 * h * 768
    attn = layers * (h * (32 + 2 * 4) * 128 // 2 + h * 32 * 128 // 2 + 2 * 128 + 2 * h + 128 * h)
    vocab = 2 * 152064 // 2 * h + h
    assert plan.worst.counts["total"] == experts + attn + vocab
    assert plan.worst.counts["expert"] == experts


@pytest.mark.parametrize("tp,sp", [(1, False), (4, False), (4, True)])
def test_layer_activations_reduce_to_korthikanti_table_2(tp, sp):
    """With the paper's assumptions (q = kv = h, f = 4h, no gate, 2-byte activations, 1-byte masks)
    the per-layer terms add up to Table 2: sbh(10 + 24/t + 5as/(ht)) with TP, sbh/t (34 + 5as/h) with
    TP + SP; selective recompute drops the 5as/h term; full recompute keeps 2sbh (/t with SP)."""
    from megagsm.plan.activations import Shape, layer_bytes_per_token

    h, a, s = 4096, 32, 2048
    shape = Shape(hidden=h, heads=a, kv_heads=a, head_dim=h // a, ffn=4 * h, glu=1, vocab_padded=50304)
    args = (shape, s, 2, tp, sp, 1, False)
    if sp:
        none, selective, full = h / tp * (34 + 5 * a * s / h), 34 * h / tp, 2 * h / tp
    else:
        none, selective, full = h * (10 + 24 / tp + 5 * a * s / (h * tp)), h * (10 + 24 / tp), 2 * h
    assert layer_bytes_per_token(*args, "none") == pytest.approx(none)
    assert layer_bytes_per_token(*args, "selective") == pytest.approx(selective)
    assert layer_bytes_per_token(*args, "full") == pytest.approx(full)


def test_kv_cache_bytes_by_hand():
    """Qwen2.5-3B GSPO recipe: 36 layers x 64 rows x (2048 + 8192) positions x 2 KV heads x 128 x K,V x 2 B."""
    from megagsm.plan import plan_memory, resolve_world_size

    recipe = ROOT / "launch/recipes/gspo_qwen2.5_3b_math.yaml"
    cfg = load_config(str(recipe))
    plan = plan_memory(cfg, resolve_world_size(cfg, str(recipe), None))
    assert plan.worst.kv_cache == 36 * 64 * 10240 * 2 * 128 * 2 * 2
