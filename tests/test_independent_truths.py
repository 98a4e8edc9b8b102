"""Core arithmetic against truths computed here by hand with plain torch, never through another path of
the same code: LoRA's closed form for one adapted linear, the per-token loss normalisation of
megatron's schedule over microbatches of very different token counts, the chunked cross-entropy and
GSPO's tempered log-probs against a full-vocabulary softmax, and the sampler resumed across an epoch
boundary against the uninterrupted stream.

Tolerances (fp32): the hand computations use the same weights and inputs with other matmul blockings,
so values agree to ~1e-6 relative; 1e-5 leaves margin while every planted bug (inverted alpha/rank,
per-microbatch denominators, a dropped temperature) moves results by more than 1e-2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megagsm.data.sampler import ResumableShardedSampler
from megagsm.sft.fused_ce import chunked_vocab_parallel_cross_entropy
from megagsm.testing.multirank import run_ranks
from megagsm.testing.parity import TinyGPTSpec

RTOL, ATOL = 1e-5, 1e-5
SPEC = TinyGPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=64, vocab_size=128, seq_length=24)
RANK, ALPHA, DROPOUT = 4, 16.0, 0.25       # scale alpha / rank = 4 (its inverse would be 0.25)
TOKEN_COUNTS = [1, 44, 7]                  # loss tokens per microbatch of 2 rows: very unequal
TEMPERATURE, VOCAB_LIMIT = 0.7, 100


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ computed in one spawned rank

def _lora_case(spec):
    from megagsm.config.parallel import ParallelConfig
    from megagsm.config.train import LoraConfig
    from megagsm.models.lora import apply_lora, lora_parameters
    from megagsm.testing.parity import tiny_gpt_model

    chunks = tiny_gpt_model(spec, ParallelConfig())
    apply_lora(chunks, LoraConfig(enabled=True, rank=RANK, alpha=ALPHA, dropout=DROPOUT,
                                  targets=["linear_qkv", "linear_proj"]), seed=0)
    model = chunks[0]
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith("weight_b"):
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    attention = model.decoder.layers[0].self_attention
    out = {}
    for name in ("linear_qkv", "linear_proj"):
        linear, adapter = getattr(attention, name), getattr(attention, name + "_lora")
        x = torch.randn(5, 2, linear.weight.shape[1], generator=gen)
        base_bias = linear.bias if linear.bias is not None and not linear.skip_bias_add else None
        case = {"x": x, "W": linear.weight.detach().clone(), "A": adapter.weight_a.detach().clone(),
                "B": adapter.weight_b.detach().clone(),
                "bias": None if base_bias is None else base_bias.detach().clone()}
        with torch.no_grad():
            model.eval()
            case["eval"] = linear(x)[0]
            model.train()
            torch.manual_seed(11)
            case["train"] = linear(x)[0]
        out[name] = case
    out["adapter_names"] = sorted(lora_parameters(chunks))
    from megagsm.models.lora import merge_lora

    merge_lora(chunks)  # W += (alpha / r) B A in place, adapters removed
    model.eval()
    with torch.no_grad():
        for name in ("linear_qkv", "linear_proj"):
            out[name]["merged"] = getattr(attention, name)(out[name]["x"])[0]
    out["names_after_merge"] = sorted(n for n, _ in model.named_parameters())
    return out


def _normalisation_case(spec):
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.training import build_optimizer, train_step, wrap_ddp
    from megagsm.testing.parity import tiny_gpt_model

    gen = torch.Generator().manual_seed(5)
    s = spec.seq_length
    microbatches = []
    for count in TOKEN_COUNTS:
        tokens = torch.randint(0, spec.vocab_size, (2, s + 1), generator=gen)
        mask = torch.zeros(2 * s)
        mask[torch.randperm(2 * s, generator=gen)[:count]] = 1.0
        microbatches.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                             "loss_mask": mask.view(2, s),
                             "position_ids": torch.arange(s).expand(2, -1).contiguous()})
    chunks = tiny_gpt_model(spec, ParallelConfig(use_distributed_optimizer=False))
    model = chunks[0]
    with torch.no_grad():  # spread the logits: per-token losses then differ widely between tokens
        model.output_layer.weight.mul_(30.0)
    params = {n: p for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    # by hand: logits of every row, torch's cross-entropy, one mean over all loss tokens of the step
    losses, masks = [], []
    for mb in microbatches:
        logits = model(mb["tokens"], mb["position_ids"], None)  # [b, s, V]
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), mb["labels"].reshape(-1),
                                      reduction="none"))
        masks.append(mb["loss_mask"].reshape(-1))
    loss = (torch.cat(losses) * torch.cat(masks)).sum() / torch.cat(masks).sum()
    mean_of_means = sum(((l * m).sum() / m.sum()).item() for l, m in zip(losses, masks)) / len(losses)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    chunks = wrap_ddp(chunks, ParallelConfig(use_distributed_optimizer=False))
    optimizer = build_optimizer(chunks, OptimizerConfig(optimizer="sgd", lr=1.0, weight_decay=0.0,
                                                        clip_grad=1e9, use_distributed_optimizer=False))
    result = train_step(chunks, optimizer, microbatches, len(microbatches), s, 2)
    moved = {n: before[n] - p.detach() for n, p in chunks[0].module.named_parameters()}
    # the per-microbatch reports hold numbers, not the step's autograd graph (kept alive it would hold
    # every activation of the step)
    reports_detached = all(r["lm_loss"].grad_fn is None and not r["lm_loss"].requires_grad for r in result.reports)
    # a batch without a single loss token: loss 0 over 0 tokens, not a division by zero
    from megagsm.models.training import eval_step

    no_tokens = [dict(mb, loss_mask=torch.zeros_like(mb["loss_mask"])) for mb in microbatches]
    empty_eval = eval_step(chunks, no_tokens, len(no_tokens), s, 2)
    # a non-finite loss is reported to the caller (megatron's DDP NaN check is off), not raised inside
    with torch.no_grad():
        chunks[0].module.output_layer.weight[0, 0] = float("nan")  # every logsumexp, hence the loss, is NaN
    nan_step = train_step(chunks, optimizer, microbatches, len(microbatches), s, 2)
    return {"hand_loss": loss.item(), "mean_of_means": mean_of_means, "loss": result.loss, "num_tokens": result.num_tokens,
            "hand_grads": {n: (g if g is not None else torch.zeros_like(before[n])) for n, g in zip(params, grads)},
            "sgd_steps": moved, "nan_step": (nan_step.loss, nan_step.grad_norm),
            "reports_detached": reports_detached, "empty_eval": empty_eval}


def _tempered_log_probs_case():
    from megagsm.rl.logprobs import token_entropy, token_log_probs

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 6, 128, generator=gen) * 3
    labels = torch.randint(0, VOCAB_LIMIT, (3, 6), generator=gen)
    return {"logits": logits, "labels": labels,
            "log_probs": token_log_probs(logits, labels, TEMPERATURE, VOCAB_LIMIT),
            "entropy": token_entropy(logits, TEMPERATURE, VOCAB_LIMIT)}


def _worker(spec):
    from megagsm.config.parallel import ParallelConfig
    from megagsm.runtime import init_runtime

    init_runtime(ParallelConfig(use_distributed_optimizer=False), seed=1234)
    return {"lora": _lora_case(spec), "norm": _normalisation_case(spec), "logprobs": _tempered_log_probs_case()}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 1, SPEC)[0]


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["linear_qkv", "linear_proj"])
def test_lora_linear_is_the_closed_form(results, name):
    """y = x W^T (+ b) + (alpha / r) * dropout(x) A^T B^T, dropout as torch's with the same seed."""
    c = results["lora"][name]
    x, W, A, B = c["x"], c["W"], c["A"], c["B"]
    base = x @ W.T + (c["bias"] if c["bias"] is not None else 0)
    scale = ALPHA / RANK
    _close(c["eval"], base + scale * (x @ A.T) @ B.T)
    torch.manual_seed(11)
    dropped = F.dropout(x, DROPOUT, training=True)
    _close(c["train"], base + scale * (dropped @ A.T) @ B.T)
    assert (c["train"] - c["eval"]).abs().max() > 1e-3  # dropout really acted in training


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["linear_qkv", "linear_proj"])
def test_merged_lora_is_the_closed_form(results, name):
    """merge_lora folds (alpha / r) B A into W: the plain linear then computes x (W + (alpha / r) B A)^T."""
    c = results["lora"][name]
    x, W, A, B = c["x"], c["W"], c["A"], c["B"]
    _close(c["merged"], x @ (W + ALPHA / RANK * B @ A).T + (c["bias"] if c["bias"] is not None else 0))
    assert not any("_lora" in n for n in results["lora"]["names_after_merge"])


def test_lora_refuses_a_target_that_is_not_a_megatron_parallel_linear():
    """A targeted name on a module LoRA cannot wrap (a plain torch Linear here, as transformer-engine's
    fused modules would be) is an error naming it, never silently left without an adapter."""
    from megagsm.models.lora import _targets_in_layer

    layer = torch.nn.Module()
    layer.self_attention = torch.nn.Module()
    layer.self_attention.linear_qkv = torch.nn.Linear(4, 12)
    with pytest.raises(ValueError, match="self_attention.linear_qkv is a Linear"):
        _targets_in_layer(layer, {"linear_qkv"})


@pytest.mark.multirank
def test_lora_parameters_are_exactly_the_adapters(results):
    names = results["lora"]["adapter_names"]
    want = sorted(f"decoder.layers.{i}.self_attention.{lin}_lora.weight_{ab}"
                  for i in range(SPEC.num_layers) for lin in ("linear_qkv", "linear_proj") for ab in "ab")
    assert names == want


def test_lora_a_init_is_pefts_kaiming_uniform():
    """peft initialises A with kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))."""
    from megagsm.models.lora import _init_a

    a = _init_a(8, 400, "0.self_attention.linear_qkv", seed=0)
    bound = 1 / 400 ** 0.5
    assert a.shape == (8, 400) and a.abs().max() <= bound
    assert a.min() < -0.95 * bound and a.max() > 0.95 * bound and abs(a.mean()) < 0.05 * bound
    torch.manual_seed(0)
    ref = torch.empty(8, 400)
    torch.nn.init.kaiming_uniform_(ref, a=5 ** 0.5)  # torch's own formula for the same bound
    assert ref.abs().max() <= bound and ref.abs().max() > 0.95 * bound


@pytest.mark.multirank
def test_loss_is_the_global_token_mean_over_unequal_microbatches(results):
    r = results["norm"]
    assert r["num_tokens"] == sum(TOKEN_COUNTS)
    assert r["loss"] == pytest.approx(r["hand_loss"], rel=1e-6)
    # the mean of per-microbatch means is far from the global mean here: the test can tell them apart
    assert abs(r["mean_of_means"] - r["hand_loss"]) > 1e-2 * abs(r["hand_loss"])
    # SGD with lr 1: each parameter moved by exactly minus the gradient of the global token mean
    for name, grad in r["hand_grads"].items():
        torch.testing.assert_close(r["sgd_steps"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in r["hand_grads"].values()) > 1e-3


@pytest.mark.multirank
def test_step_reports_are_detached_and_an_empty_batch_has_loss_zero(results):
    assert results["norm"]["reports_detached"]
    assert results["norm"]["empty_eval"] == (0.0, 0)


@pytest.mark.multirank
def test_a_non_finite_loss_is_reported_not_raised(results):
    loss, grad_norm = results["norm"]["nan_step"]
    assert math.isnan(loss) and grad_norm is not None and not math.isfinite(grad_norm)


@pytest.mark.multirank
def test_tempered_log_probs_and_entropy_are_a_full_vocab_softmax(results):
    r = results["logprobs"]
    z = r["logits"][..., :VOCAB_LIMIT] / TEMPERATURE  # padded ids >= the limit are never sampled
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    _close(r["log_probs"], log_p.gather(-1, r["labels"].unsqueeze(-1)).squeeze(-1))
    _close(r["entropy"], -(log_p.exp() * log_p).sum(-1))


# ------------------------------------------------------------------ in this process

@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_cross_entropy_is_a_full_vocab_softmax(chunk):
    g = torch.Generator().manual_seed(chunk)
    s, b, h, vocab = 9, 2, 8, 61
    hidden = (torch.randn(s, b, h, generator=g) * 2).requires_grad_()
    weight = torch.randn(vocab, h, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.4).float()
    # by hand: logits z = h W^T, p = exp(z) / sum exp(z), loss = -log p[label]; the gradient of
    # sum(loss * mask) is (p - onehot) * mask for the logits
    z = torch.einsum("sbh,vh->bsv", hidden.detach().double(), weight.detach().double())
    p = torch.exp(z - z.max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    onehot = F.one_hot(labels, vocab).double()
    want_loss = -torch.log((p * onehot).sum(-1))
    grad_z = (p - onehot) * mask.double().unsqueeze(-1)
    want_gh = torch.einsum("bsv,vh->sbh", grad_z, weight.detach().double()).float()
    want_gw = torch.einsum("bsv,sbh->vh", grad_z, hidden.detach().double()).float()
    for kwargs in ({}, {"loss_mask": mask}, {"loss_mask": mask, "loss_tokens_only": True}):
        loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk, **kwargs)
        gh, gw = torch.autograd.grad((loss * mask).sum(), (hidden, weight))
        expected = want_loss.float() * (mask if kwargs.get("loss_tokens_only") else 1)
        _close(loss.detach(), expected)
        _close(gh, want_gh)
        _close(gw, want_gw)


def _stream(sampler, n):
    out = []
    while len(out) < n:
        for index in sampler:
            out.append(index)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("stop", [13, 10, 20, 27])
def test_sampler_resumes_across_an_epoch_boundary(stop):
    """Stop after `stop` samples (past the end of epoch 0, exactly at it, at the end of epoch 1),
    save, load into a fresh sampler, continue: the stream equals the uninterrupted one, and each
    epoch is a permutation of the dataset different from the other epochs."""
    n = 10
    whole = _stream(ResumableShardedSampler(n, seed=4), 3 * n)
    epochs = [whole[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]

    first = ResumableShardedSampler(n, seed=4)
    head = _stream(first, stop)
    state = first.state_dict()
    assert state["epoch"] == stop // n or (state["epoch"], state["offset"]) == (stop // n - 1, n)
    resumed = ResumableShardedSampler(n, seed=4)
    resumed.load_state_dict(dict(state))
    assert head + _stream(resumed, 3 * n - stop) == whole


def test_sampler_resumes_across_an_epoch_boundary_with_other_dp_size():
    """Two DP ranks stop inside epoch 1; one rank resumes alone and visits what they had left."""
    n = 12
    whole = _stream(ResumableShardedSampler(n, seed=2), 2 * n)
    ranks = [ResumableShardedSampler(n, seed=2, dp_rank=r, dp_size=2) for r in range(2)]
    iters = [_stream(s, 9) for s in ranks]               # 18 global samples: 6 into epoch 1
    assert sorted(iters[0][:6] + iters[1][:6]) == list(range(n))
    state = ranks[0].state_dict()
    assert (state["epoch"], state["offset"]) == (1, 6)
    single = ResumableShardedSampler(n, seed=2)
    single.load_state_dict(state)
    assert list(single) == whole[n + 6:]
