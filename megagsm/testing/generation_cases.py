"""Rank-side scenarios for the generation tests (run through megagsm.testing.multirank.run_ranks).

Models are tiny random transformers models (dense Qwen2, Qwen3-MoE) taken through megagsm's real
converter (hf-to-mcore, then the provider's build + torch_dist load), so parity with transformers
tests the engine on the weights a user would load. Everything a launch checks is returned as plain
data; tests/test_generation.py asserts on it. One launch covers many cases (a launch costs seconds).
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch

from megagsm.config.parallel import ParallelConfig

PROMPT_LENGTHS = (5, 9, 3, 13, 9, 1)
MOE_PROMPT_LENGTHS = (4, 7, 2, 7)
MAX_NEW = 12
HF_SEED = 3
# forced response lengths (response_lengths) for refilled generation: rows end at different steps, so
# freed rows are refilled while the others decode
FORCED_LENGTHS = (8, 12, 1, 7, 5, 2)


def prompts(vocab: int = 256, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def dense_hf():
    from megagsm.testing.tiny_qwen2 import make_hf_model, tiny_qwen2_config

    # a larger init than usual makes next-token distributions peaked: greedy parity then tests the
    # engine, not float ties between near-equal logits
    return make_hf_model(tiny_qwen2_config(initializer_range=0.2), seed=HF_SEED)


def moe_hf(out_dir):
    """Tiny Qwen3-MoE (8 experts, top-2, router scores well separated), saved to out_dir."""
    from megagsm.testing.tiny_moe import make_tiny_moe_model

    return make_tiny_moe_model("qwen3_moe", out_dir, seed=HF_SEED, initializer_range=0.2)


def hf_greedy(hf, prompt_ids, max_new=MAX_NEW) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time (no padding at all)."""
    out = []
    with torch.no_grad():
        for p in prompt_ids:
            ids = torch.tensor([p])
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0)
            out.append(seq[0, len(p):].tolist())
    return out


def forward_logprobs(model, prompt_ids, result, vocab: int) -> float:
    """Max |engine log-prob - log_softmax of a fresh full forward| over every generated token. The
    forward is megagsm.models.forward.forward_logits (megatron's own schedule, no KV cache)."""
    from megatron.core import parallel_state as ps

    from megagsm.models.forward import forward_logits

    seqs = [prompt_ids[result.prompt_index[j]] + result.completion(j)
            for j in range(len(result.finish_reasons))]
    tp = ps.get_tensor_model_parallel_world_size()
    width = max(len(s) for s in seqs) if seqs else 1
    width = -(-width // tp) * tp  # sequence parallelism splits the sequence over TP ranks
    tokens = torch.zeros(max(len(seqs), 1), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        tokens[j, : len(s)] = torch.tensor(s)  # right padding: causal attention never sees it
    logp = torch.log_softmax(forward_logits([model], tokens, vocab).float(), dim=-1)
    model.eval()
    worst = 0.0
    for j, s in enumerate(seqs):
        n = int(result.lengths[j])
        start = len(s) - n
        ref = logp[j, start - 1: len(s) - 1].gather(-1, tokens[j, start: len(s)].unsqueeze(-1))
        worst = max(worst, (ref.squeeze(-1) - result.logprobs[j, :n]).abs().max().item())
    return worst


def train_step_after_generation(model, tokens: list[int]) -> bool:
    """A training forward + backward on the same model right after generate(): nothing created under
    generation's inference_mode may leak into the training graph. Returns whether grads are finite."""
    from megagsm.generation.mode import unwrap

    gpt = unwrap(model)
    was = gpt.training
    gpt.train()
    gpt.zero_grad(set_to_none=True)
    ids = torch.tensor([tokens])
    out = gpt(ids, torch.arange(len(tokens))[None], None, labels=ids)
    ok = True  # a pipeline stage without the loss has nothing to backprop alone
    if gpt.post_process:
        out.float().mean().backward()
        ok = all(torch.isfinite(p.grad).all() for p in gpt.parameters() if p.grad is not None)
    gpt.zero_grad(set_to_none=True)
    gpt.train(was)
    return bool(ok)


def decode_shapes(run):
    """run() while recording the (tokens, mask, write columns) shapes of every per-row decoding
    forward of refilled generation. Returns (run's result, the distinct shapes seen)."""
    from megagsm.generation.forward import StageRunner

    seen, real = set(), StageRunner.forward

    def recording(self, tokens, positions, attention_mask, context, *args, **kwargs):
        if context is not None and context.row_columns is not None:
            seen.add((tuple(tokens.shape), tuple(attention_mask.shape), tuple(context.row_columns.shape)))
        return real(self, tokens, positions, attention_mask, context, *args, **kwargs)

    StageRunner.forward = recording
    try:
        return run(), sorted(seen)
    finally:
        StageRunner.forward = real


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty gives NaN-filled floating tensors: memory nobody wrote must never reach a result
    (per-row decoding attends over columns some rows have not written yet)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def refill_cases(model, vocab, tok, ps_, greedy_ref, stop_id) -> dict:
    """generate_refilled on one process: fewer cache rows than sequences, so prompts are prefilled
    into rows as others finish (forced lengths make them finish at different steps)."""
    from megagsm.generation import KVCacheTooLarge, SamplingParams, generate_batched, generate_refilled

    out = {}
    refill = partial(generate_refilled, vocab_limit=vocab)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    with nan_filled_empty():
        r = refill(model, ps_, greedy, max_batch_size=2)
    out["refill_greedy"] = r.completions()
    out["refill_greedy_lp_err"] = forward_logprobs(model, ps_, r, vocab)
    out["refill_prompt_index"] = r.prompt_index
    eos = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[stop_id])
    r = refill(model, ps_, eos, max_batch_size=3, response_lengths=list(FORCED_LENGTHS))
    out["refill_forced"], out["refill_forced_reasons"] = r.completions(), r.finish_reasons
    out["refill_forced_lp_err"] = forward_logprobs(model, ps_, r, vocab)
    s = generate_batched(model, ps_, eos, max_batch_size=3, response_lengths=list(FORCED_LENGTHS), vocab_limit=vocab)
    out["static_forced"], out["static_forced_reasons"] = s.completions(), s.finish_reasons
    # cuda_graphs mode (no capture on CPU): every decoding forward has one shape, same results
    g, out["static_shape_set"] = decode_shapes(lambda: refill(
        model, ps_, eos, max_batch_size=3, response_lengths=list(FORCED_LENGTHS), cuda_graphs=True))
    _, out["eager_shape_count"] = decode_shapes(lambda: refill(
        model, ps_, eos, max_batch_size=3, response_lengths=list(FORCED_LENGTHS)))
    out["eager_shape_count"] = len(out["eager_shape_count"])
    out["static_shape_completions"] = g.completions()
    out["static_shape_lp_diff"] = (g.logprobs - r.logprobs).abs().max().item()

    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, n=3, seed=5)
    a = refill(model, ps_, sampled, max_batch_size=6)
    b = refill(model, ps_, sampled, max_batch_size=6)
    out["refill_sample_same_seed_equal"] = a.completions() == b.completions()
    out["refill_sample_lp_err"] = forward_logprobs(model, ps_, a, vocab)
    out["refill_sample_prompt_index"] = a.prompt_index
    stop = tok.decode(greedy_ref[1])[3:5]
    r = refill(model, ps_, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_strings=[stop]), tokenizer=tok,
               max_batch_size=2)
    out["refill_stop_texts"], out["refill_stop_reasons"] = r.texts, r.finish_reasons
    # all sequences fit the rows from the start: the shared-offset decode serves (one process: no lockstep)
    from megagsm.generation.refill import _nothing_waits

    out["refill_nothing_waits"] = [_nothing_waits(ps_, SamplingParams(n=2), rows) for rows in (2 * len(ps_), 2 * len(ps_) - 1)]
    try:
        refill(model, ps_, greedy, max_batch_size=2, kv_cache_bytes=1000)
        out["refill_too_large"] = None
    except KVCacheTooLarge as e:
        out["refill_too_large"] = str(e)
    return out


def moe_refill_routing(moe, vocab, mp, eos_id) -> dict:
    """Routing recorded by the refilled path (rows move and refill) against the static path's."""
    from megagsm.generation import SamplingParams, generate, generate_refilled
    from megagsm.models.router_replay import ModelRouting

    routing = ModelRouting([moe])
    params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[eos_id])
    forced = [2, 12, 5, 9]
    static = generate(moe, mp, params, vocab_limit=vocab, routing=routing, response_lengths=forced)
    refill = generate_refilled(moe, mp, params, vocab_limit=vocab, routing=routing, response_lengths=forced,
                               max_batch_size=2)
    return {"moe_refill_completions": refill.completions(),
            "moe_refill_static_completions": static.completions(),
            "moe_refill_routing_shapes_ok": all(
                r.shape[0] == len(mp[i]) + int(n) - 1
                for r, i, n in zip(refill.routing, refill.prompt_index, refill.lengths)),
            "moe_refill_routing_equal": all(torch.equal(a, b) for a, b in zip(static.routing, refill.routing))}


def _init(parallel: ParallelConfig, seed=1234):
    from megagsm.runtime import init_runtime

    return init_runtime(parallel, seed=seed)


def _load(mcore_dir, parallel: ParallelConfig):
    from megagsm.testing.tiny_qwen2 import load_converted

    return load_converted(mcore_dir, parallel)


def single_process_cases(work_dir: str) -> dict:
    from megagsm.generation import KVCacheTooLarge, SamplingParams
    from megagsm.generation import generate as engine_generate
    from megagsm.runtime import cpu_compat
    from megagsm.testing.tiny_qwen2 import char_tokenizer, convert

    work = Path(work_dir)
    _init(ParallelConfig())
    out = {}
    with cpu_compat.suspended():  # generation's fast path: the torch-function mode is off...
        try:
            torch.zeros(1, device="cuda")
            out["suspended_mode_off"] = False
        except (RuntimeError, AssertionError):
            out["suspended_mode_off"] = True
    out["mode_back"] = str(torch.zeros(1, device="cuda").device) == "cpu"  # ...and back after

    hf, tok = dense_hf(), char_tokenizer(256)
    ps_ = prompts()
    out["hf"] = hf_greedy(hf, ps_)
    out["dense_mcore"] = str(convert(hf, tok, work, name="dense"))
    model, vocab = _load(out["dense_mcore"], ParallelConfig())
    generate = partial(engine_generate, vocab_limit=vocab)
    lp = partial(forward_logprobs, vocab=vocab)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    for side in ("left", "right"):
        r = generate(model, ps_, greedy, padding_side=side)
        out[f"greedy_{side}"] = r.completions()
        out[f"greedy_{side}_lp_err"] = lp(model, ps_, r)
        out[f"greedy_{side}_reasons"] = r.finish_reasons
        # prefill in row chunks (batch offsets into the cache): 1-2 prompts per chunk
        r = generate(model, ps_, greedy, padding_side=side, max_prefill_tokens=2 * 13)
        out[f"greedy_{side}_chunked"] = r.completions()

    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.9, n=3, seed=5)
    a = generate(model, ps_, sampled)
    b = generate(model, ps_, sampled)
    c = generate(model, ps_, SamplingParams(**{**sampled.__dict__, "seed": 6}))
    out["sample_same_seed_equal"] = a.completions() == b.completions()
    out["sample_other_seed_equal"] = a.completions() == c.completions()
    out["sample_lp_err"] = lp(model, ps_, a)
    out["sample_prompt_index"] = a.prompt_index
    processed = generate(model, ps_, SamplingParams(**{**sampled.__dict__, "logprobs": "processed"}))
    out["processed_same_tokens"] = processed.completions() == a.completions()
    out["processed_le_zero"] = bool((processed.logprobs <= 1e-6).all())
    out["processed_differs_from_raw"] = not torch.allclose(processed.logprobs, a.logprobs)

    many = generate(model, [ps_[0]], SamplingParams(max_new_tokens=6, temperature=1.0, n=8, seed=1))
    out["n8_distinct"] = len({tuple(c) for c in many.completions()})
    out["n8_lp_err"] = lp(model, [ps_[0]], many)

    # EOS: prompt 0's 5th greedy token becomes a stop token; every row must equal its greedy run cut
    # after the first stop token (rows finishing early leave the batch: compaction must keep the rest)
    stop_id = out["greedy_left"][0][4]
    r = generate(model, ps_, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[stop_id]))
    out["eos_id"] = stop_id
    out["eos_completions"] = r.completions()
    out["eos_reasons"] = r.finish_reasons
    out["eos_lp_err"] = lp(model, ps_, r)

    # stop strings on decoded text (character tokenizer: one token = one character)
    text1 = tok.decode(out["greedy_left"][1])
    stop = text1[3:5]
    r = generate(model, ps_, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_strings=[stop]),
                 tokenizer=tok)
    out["stop_string"] = stop
    out["stop_texts"] = r.texts
    out["stop_full_texts"] = [tok.decode(c) for c in out["greedy_left"]]
    out["stop_completions"] = r.completions()
    out["stop_reasons"] = r.finish_reasons

    try:
        generate(model, ps_, greedy, kv_cache_bytes=1000)
        out["too_large"] = None
    except KVCacheTooLarge as e:
        out["too_large"] = str(e)
    out.update(refill_cases(model, vocab, tok, ps_, out["greedy_left"], stop_id))

    # training <-> generation on the same weights
    model.train()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    loss = model(torch.tensor([ps_[3]]), torch.arange(13)[None], None).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    r = generate(model, ps_, greedy)
    out["train_mode_restored"] = model.training and all(m.training for m in model.modules())
    # generation's plain matmul for megatron's linears is scoped to it: training gets megatron's back
    from megagsm.generation.mode import generation_mode

    def plain_matmul_linears():
        return sum("_forward_impl" in m.__dict__ for m in model.modules())

    with generation_mode(model):
        out["plain_matmul_linears_inside"] = plain_matmul_linears()
    out["plain_matmul_linears_after"] = plain_matmul_linears()
    out["no_weight_copy"] = ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}
    out["grads_untouched"] = len(grads) > 0 and all(
        torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
    out["train_mode_greedy_equal"] = r.completions() == out["greedy_left"]
    out["train_after_generate"] = train_step_after_generation(model, ps_[3][:12])
    model.eval()

    # MoE: Qwen3-MoE through the converter, greedy parity with transformers
    moe_ref = moe_hf(work / "moe-hf")
    mp = prompts(lengths=MOE_PROMPT_LENGTHS)
    out["moe_hf"] = hf_greedy(moe_ref, mp)
    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore

    convert_hf_to_mcore(work / "moe-hf", work / "moe-mcore", ParallelConfig(), progress=False)
    out["moe_mcore"] = str(work / "moe-mcore")
    moe, moe_vocab = _load(out["moe_mcore"], ParallelConfig())
    r = engine_generate(moe, mp, greedy, vocab_limit=moe_vocab)
    out["moe_greedy"] = r.completions()
    out["moe_greedy_lp_err"] = forward_logprobs(moe, mp, r, moe_vocab)
    r = engine_generate(moe, mp, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, n=2, seed=3),
                        vocab_limit=moe_vocab)
    out["moe_sample_lp_err"] = forward_logprobs(moe, mp, r, moe_vocab)
    out["moe_eos_id"] = out["moe_hf"][1][3]
    r = engine_generate(moe, mp, SamplingParams(max_new_tokens=MAX_NEW, greedy=True,
                                                stop_token_ids=[out["moe_eos_id"]]), vocab_limit=moe_vocab)
    out["moe_eos_completions"] = r.completions()
    out.update(moe_refill_routing(moe, moe_vocab, mp, out["moe_eos_id"]))
    return out


TWO_RANK_LAYOUTS = {
    "tp2": ParallelConfig(tp=2),
    "tp2_sp": ParallelConfig(tp=2, sequence_parallel=True),
    "pp2": ParallelConfig(pp=2),
    "dp2": ParallelConfig(),
}


def two_rank_cases(dense_mcore: str, moe_mcore: str, moe_eos_id: int) -> dict:
    """Every 2-rank layout in one launch: dense TP2, TP2+SP, PP2, DP2; Qwen3-MoE EP2 and TP2+EP2."""
    import torch.distributed as dist

    from megagsm.generation import SamplingParams, generate, generate_batched, generate_refilled

    out = {}
    ps_ = prompts()
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, n=2, seed=11)
    for name, layout in TWO_RANK_LAYOUTS.items():
        _init(layout)
        model, vocab = _load(dense_mcore, layout)
        mine = ps_ if name != "dp2" else ps_[dist.get_rank()::2]  # DP ranks: own prompts
        r = generate(model, mine, greedy, padding_side="right" if name == "pp2" else "left",
                     vocab_limit=vocab)
        out[f"{name}_greedy"] = r.completions()
        out[f"{name}_greedy_lp_err"] = forward_logprobs(model, mine, r, vocab)
        r = generate(model, mine, sampled, vocab_limit=vocab)
        out[f"{name}_sample_lp_err"] = forward_logprobs(model, mine, r, vocab)
        out[f"{name}_sample"] = r.completions()
        again = generate(model, mine, sampled, vocab_limit=vocab)
        out[f"{name}_sample_reproducible"] = again.completions() == r.completions()
        # refilled: 2 cache rows for 6 (DP: 3) prompts; samples reproducible at this layout
        out[f"{name}_refill_greedy"] = generate_refilled(model, mine, greedy, vocab_limit=vocab,
                                                         max_batch_size=2).completions()
        r = generate_refilled(model, mine, sampled, vocab_limit=vocab, max_batch_size=3)
        out[f"{name}_refill_sample_lp_err"] = forward_logprobs(model, mine, r, vocab)
        out[f"{name}_refill_sample"] = r.completions()
        again = generate_refilled(model, mine, sampled, vocab_limit=vocab, max_batch_size=3)
        out[f"{name}_refill_sample_reproducible"] = again.completions() == r.completions()
        if name == "tp2_sp":  # static decode shapes under tensor parallelism
            out["tp2_sp_static_shape_greedy"] = generate_refilled(
                model, mine, greedy, vocab_limit=vocab, max_batch_size=2, cuda_graphs=True).completions()
        if name == "tp2":  # one rank's cache does not fit: both ranks raise (none waits forever)
            from megagsm.generation import KVCacheTooLarge

            try:
                generate(model, mine, greedy, vocab_limit=vocab,
                         kv_cache_bytes=1000 if dist.get_rank() == 0 else None)
                out["tp2_too_large"] = None
            except KVCacheTooLarge as e:
                out["tp2_too_large"] = str(e)
            try:
                generate_refilled(model, mine, greedy, vocab_limit=vocab, max_batch_size=2,
                                  kv_cache_bytes=1000 if dist.get_rank() == 1 else None)
                out["tp2_refill_too_large"] = None
            except KVCacheTooLarge as e:
                out["tp2_refill_too_large"] = str(e)
        if name != "pp2":  # (a pipeline needs the schedule to train; generation itself is tested)
            out[f"{name}_train_after_generate"] = train_step_after_generation(model, ps_[3][:12])

    # MoE, expert parallel: ranks hold different prompts and finish at different steps, so the
    # finished rank keeps joining the other's expert exchanges (lockstep dummy forwards)
    mp = prompts(lengths=MOE_PROMPT_LENGTHS)
    mine = mp[:3] if dist.get_rank() == 0 else mp[3:]
    params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[moe_eos_id])
    for name, layout in (("ep2", ParallelConfig(ep=2)),
                         ("tp2ep2", ParallelConfig(tp=2, ep=2, etp=1, sequence_parallel=True))):
        _init(layout)
        moe, vocab = _load(moe_mcore, layout)
        # TP2+EP2 on 2 ranks: one data-parallel replica, so both ranks hold the same prompts
        local = mine if name == "ep2" else mp
        r = generate(moe, local, greedy, vocab_limit=vocab)
        out[f"{name}_greedy"] = r.completions()
        r = generate(moe, local, params, vocab_limit=vocab)
        out[f"{name}_eos_completions"] = r.completions()
        # refilled in lockstep: one row per rank, prompts prefilled as rows free up (rank 0: 3, rank 1: 1)
        out[f"{name}_refill_eos_completions"] = generate_refilled(moe, local, params, vocab_limit=vocab,
                                                                  max_batch_size=1).completions()
        out[f"{name}_eos_lp_err"] = forward_logprobs(moe, local, r, vocab)
        r = generate(moe, local, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, n=2, seed=3),
                     vocab_limit=vocab)
        out[f"{name}_sample_lp_err"] = forward_logprobs(moe, local, r, vocab)
        out[f"{name}_train_after_generate"] = train_step_after_generation(moe, mp[3][:6])
    _init(ParallelConfig(ep=2))
    moe, vocab = _load(moe_mcore, ParallelConfig(ep=2))
    # a rank with no prompts at all still serves the other's expert exchanges
    r = generate(moe, mine if dist.get_rank() == 0 else [], SamplingParams(max_new_tokens=4, greedy=True),
                 vocab_limit=vocab)
    out["ep2_empty_rank_lengths"] = r.lengths.tolist()
    r = generate_refilled(moe, mine if dist.get_rank() == 0 else [], SamplingParams(max_new_tokens=4, greedy=True),
                          vocab_limit=vocab, max_batch_size=2)
    out["ep2_refill_empty_rank_lengths"] = r.lengths.tolist()
    # more prompts than one batch: rank 0 runs 2 groups, rank 1 one group and one empty group
    r = generate_batched(moe, mine, params, max_batch_size=2, vocab_limit=vocab)
    out["ep2_batched_completions"] = r.completions()
    out["ep2_batched_prompt_index"] = r.prompt_index
    # prefill chunks: 3 on rank 0, 1 on rank 1 (which joins the other two with dummy forwards)
    r = generate(moe, mine, params, max_prefill_tokens=7, vocab_limit=vocab)
    out["ep2_chunked_completions"] = r.completions()
    return out
