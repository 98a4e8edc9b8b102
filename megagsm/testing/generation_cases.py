"""Rank-side scenarios for the generation tests (run through megagsm.testing.multirank.run_ranks).

Everything a launch checks is returned as plain data; tests/test_generation.py asserts on it. One
launch covers many cases because a launch costs seconds.
"""
from __future__ import annotations

import torch

from megagsm.config.parallel import ParallelConfig

PROMPT_LENGTHS = (5, 9, 3, 13, 9, 1)
MAX_NEW = 12
HF_SEED = 3


def prompts(vocab: int = 256, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def dense_hf():
    from megagsm.testing.tiny_qwen2 import make_hf_model, tiny_qwen2_config

    # a larger init than usual makes next-token distributions peaked: greedy parity then tests the
    # engine, not float ties between near-equal logits
    return make_hf_model(tiny_qwen2_config(initializer_range=0.2), seed=HF_SEED)


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


@torch.no_grad()
def forward_logprobs(model, prompt_ids, result) -> float:
    """Max |engine log-prob - log_softmax of a fresh full forward| over every generated token."""
    from megagsm.generation.forward import StageRunner, sequence_parallel_off
    from megagsm.generation.mode import generation_mode, unwrap

    gpt = unwrap(model)
    seqs = [prompt_ids[result.prompt_index[j]] + result.completion(j)
            for j in range(len(result.finish_reasons))]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        tokens[j, : len(s)] = torch.tensor(s)  # right padding: causal attention never sees it
    positions = torch.arange(width).expand(len(seqs), width)
    with generation_mode(gpt), sequence_parallel_off(gpt, gpt.config):
        runner = StageRunner(gpt, gpt.config)
        logits = runner.forward(tokens, positions, None, None, last_only=False)
        runner.close()
    if logits is None:  # not the last pipeline stage
        return 0.0
    logp = torch.log_softmax(logits.float(), dim=-1)
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
    if out is None or not torch.is_tensor(out) or not gpt.post_process:
        ok = True  # a pipeline stage without the loss: nothing to backprop alone
    else:
        out.float().mean().backward()
        ok = all(torch.isfinite(p.grad).all() for p in gpt.parameters() if p.grad is not None)
    gpt.zero_grad(set_to_none=True)
    gpt.train(was)
    return bool(ok)


def _init(parallel: ParallelConfig, seed=1234):
    from megagsm.runtime import init_runtime

    return init_runtime(parallel, seed=seed)


def dense_model(hf, parallel: ParallelConfig | None = None):
    from megagsm.testing.tiny_qwen2 import build_megatron_from_hf

    return build_megatron_from_hf(hf, parallel=parallel)


def moe_model(parallel: ParallelConfig, full_state=None):
    """Tiny Qwen2-like MoE GPTModel (4 experts, top-2); weights from `full_state` when given."""
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.testing.parity import TinyGPTSpec, tiny_gpt_model

    spec = TinyGPTSpec(num_layers=2, vocab_size=256, seq_length=64, num_moe_experts=4)
    chunks = tiny_gpt_model(spec, parallel)
    if full_state is None:
        # the default init is near-uniform over the vocabulary: sharpen it as for the dense model
        with torch.no_grad():
            for p in chunks[0].parameters():
                if p.dim() > 1:
                    p.mul_(8.0)
        full_state = gather_full_state_dict(chunks)
    else:
        load_full_state_dict(chunks, full_state)
    return chunks[0].eval(), full_state


def single_process_cases() -> dict:
    from megagsm.generation import KVCacheTooLarge, SamplingParams, generate
    from megagsm.testing.tiny_qwen2 import char_tokenizer

    _init(ParallelConfig())
    out = {}
    from megagsm.runtime import cpu_compat

    with cpu_compat.suspended():  # generation's fast path: the torch-function mode is off...
        try:
            torch.zeros(1, device="cuda")
            out["suspended_mode_off"] = False
        except (RuntimeError, AssertionError):
            out["suspended_mode_off"] = True
    out["mode_back"] = str(torch.zeros(1, device="cuda").device) == "cpu"  # ...and back after
    hf = dense_hf()
    ps_ = prompts()
    out["hf"] = hf_greedy(hf, ps_)
    model = dense_model(hf)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    for side in ("left", "right"):
        r = generate(model, ps_, greedy, padding_side=side)
        out[f"greedy_{side}"] = r.completions()
        out[f"greedy_{side}_lp_err"] = forward_logprobs(model, ps_, r)
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
    out["sample_lp_err"] = forward_logprobs(model, ps_, a)
    out["sample_prompt_index"] = a.prompt_index
    processed = generate(model, ps_, SamplingParams(**{**sampled.__dict__, "logprobs": "processed"}))
    out["processed_same_tokens"] = processed.completions() == a.completions()
    out["processed_le_zero"] = bool((processed.logprobs <= 1e-6).all())
    out["processed_differs_from_raw"] = not torch.allclose(processed.logprobs, a.logprobs)

    many = generate(model, [ps_[0]], SamplingParams(max_new_tokens=6, temperature=1.0, n=8, seed=1))
    out["n8_distinct"] = len({tuple(c) for c in many.completions()})
    out["n8_lp_err"] = forward_logprobs(model, [ps_[0]], many)

    # EOS: prompt 0's 5th greedy token becomes a stop token; every row must equal its greedy run cut
    # after the first stop token (rows finishing early leave the batch: compaction must keep the rest)
    stop_id = out["greedy_left"][0][4]
    r = generate(model, ps_, SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[stop_id]))
    out["eos_id"] = stop_id
    out["eos_completions"] = r.completions()
    out["eos_reasons"] = r.finish_reasons
    out["eos_lp_err"] = forward_logprobs(model, ps_, r)

    # stop strings on decoded text (character tokenizer: one token = one character)
    tok = char_tokenizer(256)
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

    # training <-> generation on the same weights
    model.train()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    loss = model(torch.tensor([ps_[3]]), torch.arange(13)[None], None).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    r = generate(model, ps_, greedy)
    out["train_mode_restored"] = model.training and all(m.training for m in model.modules())
    out["no_weight_copy"] = ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}
    out["grads_untouched"] = len(grads) > 0 and all(
        torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
    out["train_mode_greedy_equal"] = r.completions() == out["greedy_left"]
    out["train_after_generate"] = train_step_after_generation(model, ps_[3][:12])
    model.eval()

    moe, full_state = moe_model(ParallelConfig())
    mp = prompts(lengths=(4, 7, 2, 7))
    r = generate(moe, mp, SamplingParams(max_new_tokens=MAX_NEW, greedy=True))
    out["moe_state"] = full_state
    out["moe_greedy"] = r.completions()
    out["moe_greedy_lp_err"] = forward_logprobs(moe, mp, r)
    r = generate(moe, mp, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, n=2, seed=3))
    out["moe_sample_lp_err"] = forward_logprobs(moe, mp, r)
    out["moe_eos_id"] = out["moe_greedy"][1][3]
    r = generate(moe, mp, SamplingParams(max_new_tokens=MAX_NEW, greedy=True,
                                         stop_token_ids=[out["moe_eos_id"]]))
    out["moe_eos_completions"] = r.completions()
    return out


TWO_RANK_LAYOUTS = {
    "tp2": ParallelConfig(tp=2),
    "tp2_sp": ParallelConfig(tp=2, sequence_parallel=True),
    "pp2": ParallelConfig(pp=2),
    "dp2": ParallelConfig(),
}


def two_rank_cases(moe_state, moe_eos_id) -> dict:
    """Every 2-rank layout in one launch: dense TP2, TP2+SP, PP2, DP2, and MoE EP2."""
    import torch.distributed as dist

    from megagsm.generation import SamplingParams, generate

    out = {}
    hf = dense_hf()
    ps_ = prompts()
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, n=2, seed=11)
    for name, layout in TWO_RANK_LAYOUTS.items():
        _init(layout)
        model = dense_model(hf, layout)
        mine = ps_ if name != "dp2" else ps_[dist.get_rank()::2]  # DP ranks: own prompts
        r = generate(model, mine, greedy, padding_side="right" if name == "pp2" else "left")
        out[f"{name}_greedy"] = r.completions()
        out[f"{name}_greedy_lp_err"] = forward_logprobs(model, mine, r)
        r = generate(model, mine, sampled)
        out[f"{name}_sample_lp_err"] = forward_logprobs(model, mine, r)
        out[f"{name}_sample"] = r.completions()
        again = generate(model, mine, sampled)
        out[f"{name}_sample_reproducible"] = again.completions() == r.completions()
        if name != "pp2":  # (a pipeline needs the schedule to train; generation itself is tested)
            out[f"{name}_train_after_generate"] = train_step_after_generation(model, ps_[3][:12])

    # MoE, expert parallel: ranks hold different prompts and finish at different steps, so the
    # finished rank keeps joining the other's expert exchanges (lockstep dummy forwards)
    _init(ParallelConfig(ep=2))
    moe, _ = moe_model(ParallelConfig(ep=2), moe_state)
    mp = prompts(lengths=(4, 7, 2, 7))
    mine = mp[:3] if dist.get_rank() == 0 else mp[3:]
    params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=[moe_eos_id])
    r = generate(moe, mine, params)
    out["ep2_eos_completions"] = r.completions()
    out["ep2_eos_lp_err"] = forward_logprobs(moe, mine, r)
    r = generate(moe, mine, SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, n=2, seed=3))
    out["ep2_sample_lp_err"] = forward_logprobs(moe, mine, r)
    # a rank with no prompts at all still serves the other's expert exchanges
    r = generate(moe, mine if dist.get_rank() == 0 else [], SamplingParams(max_new_tokens=4, greedy=True))
    out["ep2_empty_rank_lengths"] = r.lengths.tolist()
    # more prompts than one batch: rank 0 runs 2 groups, rank 1 one group and one empty group
    from megagsm.generation import generate_batched

    r = generate_batched(moe, mine, params, max_batch_size=2)
    out["ep2_batched_completions"] = r.completions()
    # prefill chunks: 3 on rank 0, 1 on rank 1 (which joins the other two with dummy forwards)
    r = generate(moe, mine, params, max_prefill_tokens=7)
    out["ep2_chunked_completions"] = r.completions()
    out["ep2_train_after_generate"] = train_step_after_generation(moe, mp[3][:6])
    out["ep2_batched_prompt_index"] = r.prompt_index
    return out
