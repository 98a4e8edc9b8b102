"""generate_refilled(): one engine call whose batch stays full (continuous batching).

generate_batched() cuts a rank's prompts into groups and runs generate() per group: each group
decodes until its longest row ends, and the rows that finish early leave slots nobody uses. Here a
fixed set of `max_batch_size` cache rows serves every prompt of the call: when rows finish, waiting
prompts (each with its n samples) are prefilled into the freed rows and decode alongside the others.

Cache layout: the same KVCache (megatron's StaticInferenceContext buffers, sized and checked up front
for max_batch_size rows x (longest prompt + max_new_tokens) columns), but every row holds its own
sequence from column 0 and has its own length: a prompt is prefilled into columns [0, L) of a free
row (right-padded with the other prompts of its prefill chunk; `batch_size_offset` points at the
row), copied to its n rows (`expand_rows`), and each decoding step writes row r's token at column
length[r] with RoPE at that position (rope_cache.py, per-row decoding). Positions are then exactly
those of an unpadded sequence, so no row ever needs shifting. Finished rows are compacted away as in
generate(), so the live rows are always [0, b) and the free ones the tail the next prompts take.

Why not megatron-core 0.16.1's DynamicInferenceContext / DynamicInferenceEngine: its attention path
asserts flash-attn >= 2.7.3 (or FA3) for dynamic batching (transformer/attention.py) and runs its
paged cache through flash_attn_varlen_func / flash_attn_with_kvcache and a triton KV-append kernel,
none of which exist on CPU (nor on the project's GPU machine, which has no flash-attn); the context
itself constructs on CPU (checked) but no forward can run with it.

Per step every rank of a model-parallel group runs the same bookkeeping (tokens are broadcast by the
sampler rank). With expert parallelism all ranks step together: one all-reduce per step agrees on
whether anyone decodes and how many prefill forwards the next step runs; a rank with less to do
runs 1-token dummy forwards. `cuda_graphs`: every decoding forward has the same shapes
(generation/static_decode.py) and, on CUDA, is captured once and replayed.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.generation.batched import generate_batched
from megagsm.generation.engine import GenerationOutput, _compaction_moves, _Generation, run_generation
from megagsm.generation.mode import unwrap
from megagsm.generation.rope_cache import per_row_supported, rope_once
from megagsm.generation.sampling import SamplingParams
from megagsm.generation.static_decode import StaticDecode


def generate_refilled(
    model,
    prompts_token_ids: list[list[int]],
    params: SamplingParams,
    tokenizer=None,
    *,
    max_batch_size: int = 64,
    pad_token_id: int = 0,
    kv_cache_bytes: int | None = None,
    vocab_limit: int | None = None,
    max_prefill_tokens: int = 16384,
    routing=None,
    response_lengths: list[int] | None = None,
    cuda_graphs: bool = False,
) -> GenerationOutput:
    """Same contract as generate_batched (sequence j is sample j % n of prompt j // n, in prompt
    order; arguments as in engine.generate) with at most max_batch_size sequences decoding at once
    (at least n: a prompt's samples start together). cuda_graphs: static decode shapes, captured as
    a CUDA graph on a CUDA device (dense models, one pipeline stage). Models whose attention cannot
    decode per row (multi-latent attention), and calls whose sequences all fit max_batch_size rows
    (nothing to refill), go through generate_batched instead."""
    if any(len(p) == 0 for p in prompts_token_ids):
        raise ValueError("every prompt needs at least one token")
    gpt = unwrap(model)
    if not per_row_supported(gpt) and cuda_graphs:
        raise ValueError("cuda_graphs needs refilled generation, which this model's attention "
                         "(multi-latent attention or no RoPE) does not support")
    if not cuda_graphs and (not per_row_supported(gpt) or _nothing_waits(prompts_token_ids, params, max_batch_size)):
        return generate_batched(model, prompts_token_ids, params, tokenizer, max_batch_size=max_batch_size,
                                pad_token_id=pad_token_id, kv_cache_bytes=kv_cache_bytes,
                                vocab_limit=vocab_limit, max_prefill_tokens=max_prefill_tokens,
                                routing=routing, response_lengths=response_lengths)
    return run_generation(gpt, routing, lambda runner: _Refill(
        gpt, runner, prompts_token_ids, params, tokenizer, "right", pad_token_id, kv_cache_bytes, vocab_limit,
        max_prefill_tokens, routing, response_lengths, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs))


def _nothing_waits(prompts, params: SamplingParams, max_batch_size: int) -> bool:
    """Every sequence has a row from the start, so no row is ever refilled: generate()'s shared-offset
    decode is then the same schedule at less cost per step (one position for all rows; measured ~5%
    faster on CPU). Under expert parallelism ranks must run one protocol, so they always refill."""
    lockstep = dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1
    return not lockstep and len(prompts) * params.n <= max_batch_size


def generate_many(model, prompts_token_ids, params, tokenizer=None, *, continuous_batching: bool = True,
                  cuda_graphs: bool = False, **kwargs) -> GenerationOutput:
    """A rank's prompts, however many: generate_refilled, or with continuous_batching=False the
    per-group generate_batched (generation.continuous_batching; the benchmarks' baseline)."""
    if continuous_batching:
        return generate_refilled(model, prompts_token_ids, params, tokenizer, cuda_graphs=cuda_graphs, **kwargs)
    if cuda_graphs:
        raise ValueError("cuda_graphs needs continuous_batching (the static path has no static-shape decode)")
    return generate_batched(model, prompts_token_ids, params, tokenizer, **kwargs)


class _Refill(_Generation):
    """generate()'s sampling, stopping, lockstep and output code; its own cache schedule."""

    def __init__(self, *args, max_batch_size: int, cuda_graphs: bool):
        super().__init__(*args)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        n, N = self.params.n, len(self.prompts) * self.params.n
        self.rows = min(max(max_batch_size, n), N)  # cache rows; no more than there are sequences
        self.cuda_graphs = cuda_graphs
        if cuda_graphs and self.device.type == "cuda" and (self.runner.pp_size > 1 or self.lockstep
                                                            or self.model.config.num_moe_experts):
            raise ValueError("cuda_graphs captures dense models on one pipeline stage only "
                             "(pipeline sends and MoE token exchanges are not captured)")

    def run(self) -> GenerationOutput:
        P, n, T = len(self.prompts), self.params.n, self.params.max_new_tokens
        self._allocate_outputs()
        if P == 0:  # nothing here; under expert parallelism this rank still serves the others
            if self.lockstep:
                self._fail_together(None)
                self._loop(None)
            return self._output(n)
        cache = self._cache(self.rows, max(len(q) for q in self.prompts) + T, zeroed=True)
        try:
            with rope_once(self.model, cache):
                self._loop(cache)
        finally:
            cache.release()
        return self._output(n)

    # ---------------------------------------------------------------- the schedule
    def _loop(self, cache):
        """Per step: prefill the admitted prompts into free rows, sample every live row, retire the
        finished ones (compaction), admit waiting prompts for the next step, decode the live rows."""
        self.queue = deque(range(len(self.prompts)))
        self.seq = torch.zeros(0, dtype=torch.long)     # sequence held by each live row
        self.length = torch.zeros(0, dtype=torch.long)  # tokens in the cache per live row
        self.steps = torch.zeros(0, dtype=torch.long)   # response tokens sampled per live row
        static = None
        if cache is not None and self.cuda_graphs:
            static = StaticDecode(self.runner, cache, capture=self.device.type == "cuda")
        logits = None
        plan = self._admit()
        chunks = self._agree(False, len(plan))[1]
        while True:
            for c in range(chunks):
                if c < len(plan):
                    logits = _cat(logits, self._prefill_chunk(cache, plan[c]))
                else:
                    self._dummy_forward()  # another expert-parallel rank prefills
            tokens = None
            if len(self.seq):
                tokens = self._sample(logits, self.seq, self.steps)
                finished = self._finished(tokens, self.seq, self.steps)
                self.steps += 1
                if finished.any():
                    tokens = self._compact(cache, finished, tokens)
            plan = self._admit()
            anyone_decodes, chunks = self._agree(len(self.seq) > 0, len(plan))
            logits = None
            if anyone_decodes:
                if len(self.seq):
                    logits = self._decode(cache, tokens, static)
                else:
                    self._dummy_forward()
            elif chunks == 0:
                return

    def _agree(self, decodes: bool, chunks: int) -> tuple[bool, int]:
        """(anyone decodes this step, prefill forwards next step): this rank's own, or the maximum
        over all ranks when they step together."""
        if not self.lockstep:
            return decodes, chunks
        decodes, chunks = self._max_over_ranks(int(decodes), chunks)
        return bool(decodes), chunks

    def _admit(self) -> list[list[int]]:
        """Waiting prompts that fit the free rows now (n rows each), in prefill chunks of at most
        max_prefill_tokens padded tokens."""
        free = self.rows - len(self.seq)
        n = self.params.n
        chunks, chunk = [], []
        while self.queue and free >= n:
            i = self.queue.popleft()
            free -= n
            longest = max([len(self.prompts[j]) for j in chunk] + [len(self.prompts[i])])
            if chunk and longest * (len(chunk) + 1) > self.max_prefill_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(i)
        return chunks + [chunk] if chunk else chunks

    def _prefill_chunk(self, cache, prompt_ids: list[int]):
        """Prompts into columns [0, len) of the rows after the live ones, right-padded to the
        longest (causal attention keeps padding behind every real token, so no mask is needed);
        then each prompt's row is copied to its n rows. Returns their logits [rows, V] (last stage)."""
        n, first = self.params.n, len(self.seq)
        lens = torch.tensor([len(self.prompts[i]) for i in prompt_ids], dtype=torch.long)
        k, L = len(prompt_ids), int(lens.max())
        tokens = torch.full((k, L), self.pad_id, dtype=torch.long)
        for row, i in enumerate(prompt_ids):
            tokens[row, : lens[row]] = torch.tensor(self.prompts[i])
        pad = torch.arange(L).unsqueeze(0) >= lens.unsqueeze(1)
        padded = bool(pad.any())
        cache.sequence_len_offset, cache.batch_size_offset = 0, first
        cache.enable_prefill_mode()
        self.runner.last_token_index = (lens - 1).to(self.device) if padded else None
        try:
            logits = self.runner.forward(
                tokens.to(self.device), torch.arange(L).expand(k, L).to(self.device), None, cache,
                padding_mask=pad.to(self.device) if padded and self.model.config.num_moe_experts else None)
        finally:
            self.runner.last_token_index = None
            cache.batch_size_offset = 0
        if self.recorder is not None:
            self.recorder.prefill(prompt_ids, lens, "right", L)
        cache.expand_rows(k, n, first=first, upto=L)
        seq = (torch.tensor(prompt_ids).unsqueeze(1) * n + torch.arange(n)).flatten()
        self.seq = torch.cat([self.seq, seq])
        self.length = torch.cat([self.length, lens.repeat_interleave(n)])
        self.steps = torch.cat([self.steps, torch.zeros(k * n, dtype=torch.long)])
        if logits is not None and n > 1:
            logits = logits.repeat_interleave(n, dim=0)
        return logits

    def _compact(self, cache, finished, tokens):
        """Finished rows leave; live rows from the tail fill their holes (cache rows move)."""
        holes, movers = _compaction_moves(finished)
        if len(movers):
            upto = int(self.length[movers].max())
            cache.move_rows(movers.to(self.device), holes.to(self.device), upto=upto)
        keep = int((~finished).sum())
        for state in (self.seq, self.length, self.steps, tokens):
            state[holes] = state[movers]
        self.seq, self.length, self.steps = self.seq[:keep], self.length[:keep], self.steps[:keep]
        return tokens[:keep]

    def _decode(self, cache, tokens, static):
        """Feeds each live row its last sampled token at its own column; logits [b, V] (last stage)."""
        b = len(self.seq)
        cache.enable_decode_mode()
        cache.forward_id += 1
        if static is not None:
            logits = static(tokens, self.length)
        else:
            cols = self.length.to(self.device)
            width = int(self.length.max()) + 1
            mask = (torch.arange(width, device=self.device).unsqueeze(0) > cols.unsqueeze(1)).view(b, 1, 1, width)
            cache.row_columns, cache.row_index, cache.key_width = cols, torch.arange(b, device=self.device), width
            try:
                logits = self.runner.forward(tokens.view(b, 1).to(self.device), cols.view(b, 1), mask, cache)
            finally:
                cache.row_columns = cache.row_index = None
        if self.recorder is not None:
            self.recorder.decode(self.steps - 1, self.seq)
        self.length += 1
        return logits


def _cat(a, b):
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b])
