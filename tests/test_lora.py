"""LoRA on megatron's parallel linears: identity at init, frozen base, TP=2 (+SP) parity with TP=1 for
outputs, gradients (via one SGD step) and grad norm, merge equals the adapted forward, and
checkpoint-layout (sharded_state_dict) round trips. One 2-process launch runs every layout.

Tolerances (fp32): TP splits hidden-size reductions and all-reduces partial sums, so logits of the
same model agree to ~1e-6 (tiny model, |logit| < 3); 2e-5 leaves margin while a mis-sliced or
mis-reduced adapter moves logits by ~1e-1 (B is set to std 0.1, scale 2). After one SGD step with
lr 1.0 the adapters move by ~1e-2..1e-1; they must agree across layouts to 2e-5.
"""
import math

import pytest
import torch

from megagsm.config.parallel import ParallelConfig
from megagsm.config.train import LoraConfig
from megagsm.testing.multirank import run_ranks
from megagsm.testing.parity import ParityData, TinyGPTSpec, make_global_batch

pytestmark = pytest.mark.multirank

SPEC = TinyGPTSpec(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=128, vocab_size=128, seq_length=16)
LORA = dict(rank=4, alpha=8.0, dropout=0.0)
ATOL = 2e-5
LAYOUTS = {
    "tp1": ParallelConfig(use_distributed_optimizer=False),
    "tp2": ParallelConfig(tp=2, use_distributed_optimizer=False),
    "tp2_sp": ParallelConfig(tp=2, sequence_parallel=True, use_distributed_optimizer=False),
    # megagsm's default: the distributed optimizer shards the (adapter-only) grad buffer over DP
    "dp2_distopt": ParallelConfig(use_distributed_optimizer=True),
}


def _logits(chunks, batch):
    model = chunks[0]
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(batch["tokens"], batch["position_ids"], None, runtime_gather_output=True)
    model.train(was_training)
    return out.detach().clone()


def _local(batch, info):
    per = batch["tokens"].shape[0] // info.dp_size
    return {k: v[info.dp_rank * per:(info.dp_rank + 1) * per] for k, v in batch.items()}


def _worker(spec, layouts):
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.models.training import build_optimizer, train_step, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.models.lora import apply_lora, lora_parameters, merge_lora
    from megagsm.testing.parity import tiny_gpt_model

    data = ParityData(global_batch=4, micro_batch_size=2)
    batch = make_global_batch(spec, data, 0)
    cfg = LoraConfig(enabled=True, **LORA)
    out, base_state, full_state = {}, None, None
    for name, parallel in layouts.items():
        info = init_runtime(parallel, seed=1234)
        chunks = tiny_gpt_model(spec, parallel)
        if base_state is None:
            base_state = gather_full_state_dict(chunks)
        load_full_state_dict(chunks, base_state)
        base_names = [n for n, _ in chunks[0].named_parameters()]
        r = {"base_logits": _logits(chunks, batch)}
        apply_lora(chunks, cfg, seed=0)
        r["init_logits"] = _logits(chunks, batch)
        init_full = gather_full_state_dict(chunks)
        r["init_adapters"] = {k: v for k, v in init_full.items() if "_lora." in k}
        if full_state is None:  # the same non-zero B everywhere, set once from the first layout
            gen = torch.Generator().manual_seed(7)
            full_state = {k: (torch.randn(v.shape, generator=gen) * 0.1 if k.endswith("weight_b") else v)
                          for k, v in init_full.items()}
        load_full_state_dict(chunks, full_state)
        r["adapted_logits"] = _logits(chunks, batch)
        adapters = lora_parameters(chunks)
        r["trainable"] = sorted(n for n, p in chunks[0].named_parameters() if p.requires_grad)
        r["adapter_names"] = sorted(adapters)
        chunks = wrap_ddp(chunks, parallel)
        optimizer = build_optimizer(chunks, OptimizerConfig(
            optimizer="sgd" if not parallel.use_distributed_optimizer else "adam", lr=1.0 if not
            parallel.use_distributed_optimizer else 1e-2, weight_decay=0.0, clip_grad=1e6,
            use_distributed_optimizer=parallel.use_distributed_optimizer))
        # the distributed optimizer holds fp32 shards of its params; count through DDP's buffers,
        # which megatron builds from exactly the params the optimizer steps
        buffer_params = [p for c in chunks for buf in c.buffers for p in buf.params]
        r["optimizer_holds_only_adapters"] = (
            {id(p) for p in buffer_params} == {id(p) for p in adapters.values()})
        r["optimizer_numel"] = sum(p.numel() for p in buffer_params)
        if not parallel.use_distributed_optimizer:
            opt_params = [p for g in optimizer.param_groups for p in g["params"]]
            r["optimizer_holds_only_adapters"] &= (
                {id(p) for p in opt_params} == {id(p) for p in adapters.values()})
        r["adapter_numel"] = sum(p.numel() for p in adapters.values())
        local = _local(batch, info)
        mbs = [{k: v[i:i + 2] for k, v in local.items()} for i in range(0, local["tokens"].shape[0], 2)]
        result = train_step(chunks, optimizer, mbs, len(mbs), spec.seq_length, 2)
        r["loss"], r["grad_norm"] = result.loss, result.grad_norm
        trained = gather_full_state_dict(chunks)
        r["trained_adapters"] = {k: v for k, v in trained.items() if "_lora." in k}
        r["base_moved"] = max((trained[k] - base_state[k]).abs().max().item() for k in base_state)
        r["trained_logits"] = _logits(chunks, batch)
        merge_lora(chunks)
        r["merged_logits"] = _logits(chunks, batch)
        r["merged_names_match"] = [n for n, _ in chunks[0].module.named_parameters()] == base_names
        r["merged_keys_match"] = set(gather_full_state_dict(chunks)) == set(base_state)
        out[name] = r
    # dropout: active in training only (single layout is enough: it is a per-rank op)
    info = init_runtime(ParallelConfig(), seed=1234)
    chunks = apply_lora(tiny_gpt_model(spec, ParallelConfig()), LoraConfig(enabled=True, rank=4, dropout=0.5))
    for name, p in chunks[0].named_parameters():
        if name.endswith("weight_b"):
            p.data.normal_(0, 0.1)
    model = chunks[0]
    with torch.no_grad():
        model.train()
        t1 = model(batch["tokens"], batch["position_ids"], None)
        t2 = model(batch["tokens"], batch["position_ids"], None)
        model.eval()
        e1 = model(batch["tokens"], batch["position_ids"], None)
        e2 = model(batch["tokens"], batch["position_ids"], None)
    out["dropout"] = {"train_differs": (t1 - t2).abs().max().item(), "eval_same": (e1 - e2).abs().max().item()}
    # errors name the config field
    errors = []
    for bad in (LoraConfig(targets=["linear_qkvv"]), LoraConfig(rank=0)):
        try:
            apply_lora(tiny_gpt_model(spec, ParallelConfig()), bad)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2, SPEC, LAYOUTS)[0]


def _maxdiff(a, b):
    return (a - b).abs().max().item()


def test_zero_init_keeps_model_unchanged(results):
    for name, r in results.items():
        if name in LAYOUTS:
            assert _maxdiff(r["init_logits"], r["base_logits"]) == 0.0, name
            assert all(v.abs().max() == 0 for k, v in r["init_adapters"].items() if k.endswith("weight_b"))
            assert all(v.abs().max() > 0 for k, v in r["init_adapters"].items() if k.endswith("weight_a"))


def test_adapter_init_is_layout_free(results):
    ref = results["tp1"]["init_adapters"]
    # 4 targets x (A, B), layers stacked on a leading axis as megatron's checkpoints do
    assert len(ref) == 4 * 2 and all(v.shape[0] == SPEC.num_layers for v in ref.values())
    for name in ("tp2", "tp2_sp"):
        got = results[name]["init_adapters"]
        assert set(got) == set(ref)
        assert max(_maxdiff(got[k], ref[k]) for k in ref) == 0.0, name


def test_base_frozen_and_optimizer_holds_only_adapters(results):
    for name in LAYOUTS:
        r = results[name]
        assert r["trainable"] == r["adapter_names"], name
        assert r["optimizer_holds_only_adapters"], name
        assert r["optimizer_numel"] == r["adapter_numel"] > 0
        assert r["base_moved"] == 0.0, name


def test_distributed_optimizer_trains_adapters_only(results):
    r, ref = results["dp2_distopt"], results["tp1"]
    assert _maxdiff(r["adapted_logits"], ref["adapted_logits"]) < ATOL
    assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    moved = max(_maxdiff(r["trained_adapters"][k], v) for k, v in r["init_adapters"].items()
                if k.endswith("weight_a"))
    assert moved > 1e-3 and r["base_moved"] == 0.0


def test_tensor_parallel_matches_single(results):
    ref = results["tp1"]
    assert _maxdiff(ref["adapted_logits"], ref["base_logits"]) > 1e-2  # adapters matter
    moved = max(_maxdiff(ref["trained_adapters"][k], v) for k, v in ref["init_adapters"].items()
                if k.endswith("weight_a"))
    assert moved > 1e-3  # the step changed A, so equal A's below compare gradients
    for name in ("tp2", "tp2_sp"):
        r = results[name]
        assert _maxdiff(r["base_logits"], ref["base_logits"]) < ATOL, name
        assert _maxdiff(r["adapted_logits"], ref["adapted_logits"]) < ATOL, name
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), name
        for k, v in ref["trained_adapters"].items():
            assert _maxdiff(r["trained_adapters"][k], v) < ATOL, f"{name}: {k}"
        assert _maxdiff(r["trained_logits"], ref["trained_logits"]) < ATOL, name


def test_merge_equals_adapted_forward(results):
    for name in LAYOUTS:
        r = results[name]
        assert math.isfinite(r["loss"])
        assert _maxdiff(r["merged_logits"], r["trained_logits"]) < ATOL, name
        assert r["merged_names_match"] and r["merged_keys_match"], name


def test_dropout_only_in_training(results):
    assert results["dropout"]["train_differs"] > 1e-3
    assert results["dropout"]["eval_same"] == 0.0


def test_errors_name_the_field(results):
    assert "train.lora.targets" in results["errors"][0] and "linear_qkvv" in results["errors"][0]
    assert "train.lora.rank" in results["errors"][1]
