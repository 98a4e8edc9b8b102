"""Chunked vocab-parallel cross-entropy: equal (value and gradients) to the plain loss, in one process
and under TP=2 with and without sequence parallelism; never allocates full-size logits. In the same
launch, packed SFT rows fed as THD documents give the dense per-document mask's loss and gradients
(plain and chunked loss, TP1/TP2/TP2+SP and PP2).

Tolerances (fp32): both paths do the same per-token arithmetic; only the matmul blocking of a chunk vs
the whole tensor may differ, ~1e-7 relative. rtol 1e-5 / atol 1e-6 catches any real error (a missed
all-reduce or mis-offset vocab shard changes losses by O(1)).
"""
import pytest
import torch
import torch.nn.functional as F

from megagsm.config.parallel import ParallelConfig
from megagsm.sft.fused_ce import chunked_vocab_parallel_cross_entropy
from megagsm.testing.multirank import run_ranks
from megagsm.testing.parity import ParityData, TinyGPTSpec, make_global_batch

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("s,b,vocab,chunk", [(16, 2, 50, 7), (8, 3, 64, 1), (5, 1, 33, 1000), (32, 4, 128, 32)])
def test_matches_plain_cross_entropy_single_process(s, b, vocab, chunk):
    g = torch.Generator().manual_seed(s * 1000 + chunk)
    hidden = torch.randn(s, b, 24, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 24, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    grad_out = torch.rand(b, s, generator=g)
    grad_out[0, : s // 2] = 0.0  # masked positions

    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    gh, gw = torch.autograd.grad((loss * grad_out).sum(), (hidden, weight))
    logits = torch.einsum("sbh,vh->bsv", hidden, weight)
    ref = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(b, s)
    rh, rw = torch.autograd.grad((ref * grad_out).sum(), (hidden, weight), retain_graph=True)
    assert loss.shape == (b, s) and loss.dtype == torch.float32
    _close(loss, ref)
    _close(gh, rh)
    _close(gw, rw)

    # gradients formed in the forward pass (loss_mask given): exact for grad = c * mask, and a
    # gradient that is not proportional to the mask falls back to the recompute path
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    for upstream in (mask * 1.0, mask * 0.25, grad_out):
        loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk_size=chunk, loss_mask=mask)
        gh, gw = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
        rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight), retain_graph=True)
        _close(loss, ref.detach())
        _close(gh, rh)
        _close(gw, rw)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_loss_tokens_only_skips_masked_tokens_exactly(chunk):
    g = torch.Generator().manual_seed(chunk)
    s, b, h, vocab = 10, 3, 16, 37
    hidden = torch.randn(s, b, h, generator=g, requires_grad=True)
    weight = torch.randn(vocab, h, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s)
    mask[:, :4] = 0.0      # prompt tokens
    mask[1, :] = 0.0       # a sequence with no loss tokens at all
    logits = torch.einsum("sbh,vh->bsv", hidden, weight)
    ref = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(b, s)
    for upstream in (mask, mask * 0.5):
        loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk, loss_mask=mask,
                                                    loss_tokens_only=True)
        _close(loss, ref.detach() * mask)  # skipped tokens: loss 0, the others as the full loss
        gh, gw = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
        rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight), retain_graph=True)
        _close(gh, rh)
        _close(gw, rw)
    # a gradient for a token whose loss was never computed must not be dropped silently
    loss = chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk, loss_mask=mask,
                                                loss_tokens_only=True)
    with pytest.raises(RuntimeError, match="masked-out token received a gradient"):
        loss.sum().backward()
    with pytest.raises(ValueError, match="needs the loss_mask"):
        chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk, loss_tokens_only=True)


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(6, 2, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # e.g. the frozen output layer under LoRA
    labels = torch.randint(0, 20, (2, 6))
    for mask in (None, torch.ones(2, 6)):
        hidden.grad = None
        chunked_vocab_parallel_cross_entropy(hidden, weight, labels, 4, loss_mask=mask).sum().backward()
        assert hidden.grad is not None and weight.grad is None


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_never_allocates_full_logits():
    s, b, h, vocab, chunk = 256, 2, 32, 4096, 64
    full_logits_bytes = s * b * vocab * 4
    hidden = torch.randn(s, b, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s))

    def chunked():
        chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk).sum().backward()

    def chunked_grad_in_forward():
        mask = torch.ones(b, s)
        (chunked_vocab_parallel_cross_entropy(hidden, weight, labels, chunk, loss_mask=mask) * mask).sum().backward()

    def plain():
        logits = torch.einsum("sbh,vh->bsv", hidden, weight)
        F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").sum().backward()

    # the check itself can fail: the plain loss allocates the full logits
    assert _largest_allocation(plain) >= full_logits_bytes
    # chunked: one chunk's logits [chunk, vocab] fp32 is the largest transient (weight grad is smaller)
    assert _largest_allocation(chunked) <= max(chunk * vocab * 4, vocab * h * 4)
    assert _largest_allocation(chunked_grad_in_forward) <= max(chunk * vocab * 4, vocab * h * 4)


SPEC = TinyGPTSpec(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=128, vocab_size=256, seq_length=16)
LAYOUTS = {
    "tp1": ParallelConfig(use_distributed_optimizer=False),
    "tp2": ParallelConfig(tp=2, use_distributed_optimizer=False),
    "tp2_sp": ParallelConfig(tp=2, sequence_parallel=True, use_distributed_optimizer=False),
}


def _function_case(chunk, sequence_parallel):
    """chunked vs output-layer matmul + megatron's vocab_parallel_cross_entropy on this rank's shard."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    sp = tp > 1 and sequence_parallel
    s, b, h, vocab = 12, 3, 16, 40
    g = torch.Generator().manual_seed(3)
    full_hidden = torch.randn(s, b, h, generator=g)
    full_weight = torch.randn(vocab, h, generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    grad_out = torch.rand(b, s, generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    shard = vocab // tp
    results = {}
    for name in ("chunked", "megatron", "chunked_mask", "megatron_mask", "chunked_skip_mask"):
        local_hidden = full_hidden.clone()
        if sp:
            local_hidden = scatter_to_sequence_parallel_region(local_hidden)
        local_hidden = local_hidden.detach().requires_grad_()
        weight = full_weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        if name.startswith("chunked"):
            loss = chunked_vocab_parallel_cross_entropy(
                local_hidden, weight, labels, chunk, sequence_parallel=sp,
                loss_mask=mask if name.endswith("mask") else None, loss_tokens_only="skip" in name)
        else:
            x = (gather_from_sequence_parallel_region(local_hidden, True) if sp
                 else copy_to_tensor_model_parallel_region(local_hidden))
            logits = torch.matmul(x, weight.t())
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        (loss * (mask if name.endswith("mask") else grad_out)).sum().backward()
        results[name] = (loss.detach(), local_hidden.grad, weight.grad)
    results["loss_mask"] = mask
    return results


def _gspo_response_rows_case(model, batch):
    """GSPO's log-probs from the output projection of response positions only vs from full logits."""
    from megagsm.rl.logprobs import token_log_probs
    from megagsm.rl.update import LossSpec, _model_forward, _response_log_probs

    mask, labels = batch["loss_mask"], batch["labels"] % 200  # ids the sampler could draw: < vocab_limit
    gspo_batch = {"tokens": batch["tokens"], "position_ids": batch["position_ids"], "labels": labels,
                  "response_mask": mask}
    with torch.no_grad():
        full = token_log_probs(model(batch["tokens"], batch["position_ids"], None), labels, 0.7, 200)
        output, kept = _model_forward(gspo_batch, model)
        rows = _response_log_probs(output, kept, gspo_batch, LossSpec(temperature=0.7, vocab_limit=200))
    return {"full": full, "rows": rows, "mask": mask, "n_rows": output.shape[0]}


def _packed_rows(spec, count=4):
    """Packed SFT rows of spec.seq_length: documents of mixed lengths (a prompt token without loss
    each), every row with a padding tail but the one filled exactly."""
    from megagsm.data.packing import pack_samples

    g = torch.Generator().manual_seed(7)
    samples = []
    for n in (5, 9, 2, 7, 12, 4, 6, 10, 3, 8, 11, 16):
        ids = torch.randint(1, spec.vocab_size, (n + 1,), generator=g)
        mask = torch.ones(n)
        mask[0] = 0.0
        samples.append({"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": mask})
    rows = pack_samples(samples, spec.seq_length, pad_id=0)[:count]
    assert len(rows) == count and any(r["cu_seqlens"][-1] == spec.seq_length for r in rows)
    assert any(r["cu_seqlens"][-1] < spec.seq_length for r in rows)
    return rows


def _packed_sft_case(spec, parallel, info, init):
    """One SGD(lr=1) step on the same packed rows fed as THD documents (megagsm.sft.data, the
    trainer's path: plain and chunked loss) and with the dense per-document mask (the reference)."""
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.models.training import build_optimizer, lm_forward_step, train_step, wrap_ddp
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.sft.data import step_batch
    from megagsm.sft.fused_ce import chunked_lm_forward_step
    from megagsm.testing.dense_document_mask import dense_mask_microbatch
    from megagsm.testing.parity import tiny_gpt_model

    rows = _packed_rows(spec)
    per = len(rows) // info.dp_size
    local = rows[info.dp_rank * per:(info.dp_rank + 1) * per]
    out = {}
    for name, step_fn in (("dense", lm_forward_step), ("thd", lm_forward_step),
                          ("thd_chunked", chunked_lm_forward_step(8))):
        if name == "dense":
            mbs, seq_length, mbs_size = [dense_mask_microbatch(local[i:i + 2]) for i in range(0, per, 2)], spec.seq_length, 2
        else:
            batch = step_batch(local, 0, 2, spec.seq_length, 8)
            mbs, seq_length, mbs_size = batch.microbatches, batch.seq_length, batch.micro_batch_size
            assert mbs_size == 1 and seq_length == 2 * spec.seq_length and "packed_seq_params" in mbs[0]
        chunks = tiny_gpt_model(spec, parallel)
        load_full_state_dict(chunks, init)
        chunks = wrap_ddp(chunks, parallel)
        optimizer = build_optimizer(chunks, OptimizerConfig(
            optimizer="sgd", lr=1.0, weight_decay=0.0, clip_grad=1e6, use_distributed_optimizer=False))
        res = train_step(chunks, optimizer, mbs, len(mbs), seq_length, mbs_size, forward_step_func=step_fn)
        out[name] = {"loss": res.loss, "tokens": res.num_tokens, "grad_norm": res.grad_norm,
                     "final": gather_full_state_dict(chunks)}
    return out


def _worker(spec, layouts):
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.models.training import build_optimizer, lm_forward_step, train_step, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.sft.fused_ce import chunked_lm_forward_step
    from megagsm.testing.parity import tiny_gpt_model

    data = ParityData(global_batch=4, micro_batch_size=2)
    batch = make_global_batch(spec, data, 0)
    out, init = {}, None
    for name, parallel in layouts.items():
        info = init_runtime(parallel, seed=1234)
        r = {"function": {c: _function_case(c, parallel.sequence_parallel) for c in (5, 64)}}
        for loss_kind, step_fn in (("plain", lm_forward_step), ("chunked", chunked_lm_forward_step(24))):
            chunks = tiny_gpt_model(spec, parallel)
            if init is None:
                init = gather_full_state_dict(chunks)
            load_full_state_dict(chunks, init)
            chunks = wrap_ddp(chunks, parallel)
            optimizer = build_optimizer(chunks, OptimizerConfig(
                optimizer="sgd", lr=1.0, weight_decay=0.0, clip_grad=1e6, use_distributed_optimizer=False))
            per = batch["tokens"].shape[0] // info.dp_size
            local = {k: v[info.dp_rank * per:(info.dp_rank + 1) * per] for k, v in batch.items()}
            mbs = [{k: v[i:i + 2] for k, v in local.items()} for i in range(0, per, 2)]
            res = train_step(chunks, optimizer, mbs, len(mbs), spec.seq_length, 2, forward_step_func=step_fn)
            r[loss_kind] = {"loss": res.loss, "grad_norm": res.grad_norm, "final": gather_full_state_dict(chunks)}
        r["gspo_rows"] = _gspo_response_rows_case(chunks[0], local)
        r["packed_sft"] = _packed_sft_case(spec, parallel, info, init)
        out[name] = r
    info = init_runtime(PACKED_PP2, seed=1234)
    out["pp2"] = {"packed_sft": _packed_sft_case(spec, PACKED_PP2, info, init)}
    out["init"] = init
    return out


PACKED_PP2 = ParallelConfig(pp=2, use_distributed_optimizer=False)  # packed SFT only


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2, SPEC, LAYOUTS)


@pytest.mark.multirank
def test_function_matches_megatron_vocab_parallel_cross_entropy(results):
    for rank_results in results:
        for layout in LAYOUTS:
            r = rank_results[layout]
            for chunk, case in r["function"].items():
                for mode in ("", "_mask"):
                    for got, ref in zip(case["chunked" + mode], case["megatron" + mode]):
                        _close(got, ref)
                # the output projection only on loss tokens: their losses and every gradient agree
                skip_loss, skip_gh, skip_gw = case["chunked_skip_mask"]
                ref_loss, ref_gh, ref_gw = case["megatron_mask"]
                mask = case["loss_mask"]
                assert 0 < int(mask.sum()) < mask.numel()
                _close(skip_loss, ref_loss * mask)  # loss tokens as megatron's, the others 0
                _close(skip_gh, ref_gh)
                _close(skip_gw, ref_gw)
    # and the TP=2 losses equal the TP=1 ones
    for layout in ("tp2", "tp2_sp"):
        _close(results[0][layout]["function"][5]["chunked"][0], results[0]["tp1"]["function"][5]["chunked"][0])


@pytest.mark.multirank
def test_gspo_log_probs_from_response_rows_only(results):
    for rank_results in results:
        for layout in LAYOUTS:
            case = rank_results[layout]["gspo_rows"]
            mask = case["mask"]
            assert case["n_rows"] == int(mask.sum()) < mask.numel()  # the projection ran on those rows only
            _close(case["rows"], case["full"] * mask)


@pytest.mark.multirank
def test_gpt_training_step_matches_plain_loss(results):
    init = results[0]["init"]
    # the step must move the parameters, else equal final parameters prove nothing
    moved = max((results[0]["tp1"]["plain"]["final"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3
    for layout in LAYOUTS:
        r = results[0][layout]
        plain, chunked = r["plain"], r["chunked"]
        assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-6), layout
        assert chunked["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5), layout
        assert chunked["loss"] == pytest.approx(results[0]["tp1"]["plain"]["loss"], rel=1e-6), layout
        for k, v in plain["final"].items():
            torch.testing.assert_close(chunked["final"][k], v, rtol=0, atol=2e-5, msg=f"{layout} {k}")


@pytest.mark.multirank
def test_packed_sft_as_thd_equals_the_dense_mask_path(results):
    """Packed SFT rows fed as THD documents (one [1, rows * S] sequence per microbatch) give the loss,
    token count, gradient norm and SGD(lr=1) update (= the gradients) of the dense per-document mask,
    at TP1 (DP2), TP2, TP2+SP and PP2, with the plain and the chunked loss; and the same as TP1's."""
    reference = results[0]["tp1"]["packed_sft"]["dense"]
    init = results[0]["init"]
    moved = max((reference["final"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3
    for layout in (*LAYOUTS, "pp2"):
        case = results[0][layout]["packed_sft"]
        for name in ("dense", "thd", "thd_chunked"):
            got = case[name]
            assert got["tokens"] == reference["tokens"] > 0, (layout, name)
            assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6), (layout, name)
            assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), (layout, name)
            for k, v in reference["final"].items():
                torch.testing.assert_close(got["final"][k], v, rtol=0, atol=2e-6, msg=f"{layout} {name} {k}")
