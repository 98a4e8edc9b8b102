"""generate(): batched prefill + KV-cache decoding on a megatron GPTModel."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.generation.forward import StageRunner, sequence_parallel_off
from megagsm.generation.kv_cache import KVCache, KVCacheTooLarge, check_fits
from megagsm.generation.mode import generation_mode, unwrap
from megagsm.generation.rope_cache import rope_once, rotate_keys
from megagsm.generation.routing import RoutingRecorder
from megagsm.generation.sampling import Sampler, SamplingParams
from megagsm.generation.stopping import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP_STRING,
    StopChecker,
)
from megagsm.runtime import cpu_compat
from megagsm.runtime.collectives import gather_objects

PADDING_SIDES = ("left", "right")


@dataclass
class GenerationOutput:
    """Completions of every prompt: sequence j is sample j % n of prompt j // n."""

    tokens: torch.Tensor          # [N, T] int64 completion ids, pad_token_id after `lengths`
    logprobs: torch.Tensor        # [N, T] fp32 log-prob of each sampled token, 0 after `lengths`
    lengths: torch.Tensor         # [N] int64 completion lengths (the stop token is included)
    finish_reasons: list[str]     # "eos" | "stop" (a stop string) | "length"
    prompt_index: list[int]       # [N] which prompt each sequence continues
    texts: list[str] | None = None  # decoded completions (tokenizer given), cut after a stop string
    # per sequence, [prompt + completion - 1, MoE layers, k] expert ids (routing= given): generation.routing
    routing: list[torch.Tensor] | None = None

    def completion(self, j: int) -> list[int]:
        return self.tokens[j, : int(self.lengths[j])].tolist()

    def completions(self) -> list[list[int]]:
        return [self.completion(j) for j in range(len(self.finish_reasons))]


def generate(
    model,
    prompts_token_ids: list[list[int]],
    params: SamplingParams,
    tokenizer=None,
    *,
    padding_side: str = "left",
    pad_token_id: int = 0,
    kv_cache_bytes: int | None = None,
    vocab_limit: int | None = None,
    max_prefill_tokens: int = 16384,
    routing=None,
    response_lengths: list[int] | None = None,
) -> GenerationOutput:
    """Samples completions of `prompts_token_ids` (this data-parallel rank's prompts; every rank of a
    model-parallel group passes the same ones) with the model's own weights.

    padding_side: how prompts of different lengths share the prefill. "left" pads in front (one
    prefill, the last positions line up); "right" pads behind (each prompt keeps positions 0..len-1
    in the prefill, then its cache rows are shifted to line up for decoding). Either way decoding is
    identical up to float rounding. kv_cache_bytes: memory the cache may take (default: 90% of free
    device memory). vocab_limit: ignore logits of padded vocabulary rows >= this (megatron pads the
    vocabulary to a multiple of 128 x tp). max_prefill_tokens: prompts are prefilled in row chunks of
    at most this many (padded) tokens, which bounds the prefill's activation memory. routing: a
    megagsm.models.router_replay.ModelRouting of this model: record every MoE layer's top-k choice
    per sequence and token (GenerationOutput.routing, this rank's layers). response_lengths: per
    sequence (benchmarks, tests): sequence j is stopped after exactly response_lengths[j] tokens unless
    it stopped earlier, its last token replaced by the first stop token (finish reason "eos").
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} must be one of {PADDING_SIDES}")
    if any(len(p) == 0 for p in prompts_token_ids):
        raise ValueError("every prompt needs at least one token")
    gpt = unwrap(model)
    return run_generation(gpt, routing, lambda runner: _Generation(
        gpt, runner, prompts_token_ids, params, tokenizer, padding_side, pad_token_id, kv_cache_bytes,
        vocab_limit, max_prefill_tokens, routing, response_lengths))


def run_generation(gpt, routing, build) -> GenerationOutput:
    """`build(runner).run()` (a generation over this rank's StageRunner) in generation mode, with
    sequence parallelism off; the output holds ordinary tensors and, with routing, each sequence's
    recorded experts. Shared by generate() and generate_refilled()."""
    # the CPU layer's per-call torch-function hook costs ~15% of a decoding step; megatron's
    # inference path needs only its module-level patches (checked by the multi-rank tests)
    with generation_mode(gpt), sequence_parallel_off(gpt, gpt.config), cpu_compat.suspended():
        runner = StageRunner(gpt, gpt.config)
        try:
            generation = build(runner)
            out = generation.run()
        finally:
            runner.close()
            if routing is not None:
                routing.stop()
    if routing is not None:
        out.routing = generation.recorder.per_sequence(out.lengths)
    # made under inference_mode: clones are ordinary tensors the trainer may use freely
    out.tokens, out.logprobs, out.lengths = out.tokens.clone(), out.logprobs.clone(), out.lengths.clone()
    return out


class _Generation:
    def __init__(self, model, runner, prompts, params, tokenizer, padding_side, pad_token_id,
                 kv_cache_bytes, vocab_limit, max_prefill_tokens, routing=None, response_lengths=None):
        self.model, self.runner, self.params = model, runner, params
        self.prompts = [list(map(int, p)) for p in prompts]
        self.tokenizer, self.padding_side, self.pad_id = tokenizer, padding_side, pad_token_id
        self.device = runner.device
        self.dtype = next(model.parameters()).dtype
        self.kv_cache_bytes = kv_cache_bytes
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens} must be >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.forced = forced_lengths(response_lengths, len(self.prompts) * params.n, params)
        self.stop = StopChecker(params.stop_token_ids, params.stop_strings, tokenizer, self.device)
        self.sampler = Sampler(params, self.device, vocab_limit) if runner.is_sampler else None
        # MoE with expert parallelism: ranks exchange tokens inside every forward, so all of them
        # step together until the last one is done (finished ranks run a 1-token dummy forward)
        self.lockstep = dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1
        self.recorder = (None if routing is None else
                         RoutingRecorder(routing, len(self.prompts), params.n, params.max_new_tokens))
        if self.recorder is not None:
            self.recorder.start()

    # ---------------------------------------------------------------- setup
    def _layout(self):
        lens = torch.tensor([len(p) for p in self.prompts], dtype=torch.long)
        P, L = len(self.prompts), int(lens.max())
        tokens = torch.full((P, L), self.pad_id, dtype=torch.long)
        pad = torch.zeros(P, L, dtype=torch.bool)  # True: padding position
        for i, p in enumerate(self.prompts):
            if self.padding_side == "left":
                tokens[i, L - len(p):] = torch.tensor(p)
                pad[i, : L - len(p)] = True
            else:
                tokens[i, : len(p)] = torch.tensor(p)
                pad[i, len(p):] = True
        return lens, tokens, pad

    def _allocate_outputs(self) -> None:
        """Every sequence's completion buffers, filled as it decodes."""
        N, T = len(self.prompts) * self.params.n, self.params.max_new_tokens
        self.out_tokens = torch.full((N, T), self.pad_id, dtype=torch.long)
        self.out_logprobs = torch.zeros(N, T, dtype=torch.float32)
        self.lengths = torch.zeros(N, dtype=torch.long)
        self.reasons = [FINISH_LENGTH] * N

    def _cache(self, rows: int, width: int, zeroed: bool = False) -> KVCache:
        """A KV cache of rows x width positions, once the budget holds it and the sampler's logits
        (every rank of the group stops when one cannot allocate)."""
        logits_bytes = rows * self.model.vocab_size * 4 * 3 if self.runner.last else 0  # logits + fp32 sampling copies
        problem = check_fits(self.model, rows, width, self.dtype, self.device, extra_bytes=logits_bytes,
                             budget_bytes=self.kv_cache_bytes)
        self._fail_together(problem)
        return KVCache(self.model, max_batch=rows, max_seq=width, dtype=self.dtype, device=self.device, zeroed=zeroed)

    def run(self) -> GenerationOutput:
        p = self.params
        P, n = len(self.prompts), p.n
        N, T = P * n, p.max_new_tokens
        self._allocate_outputs()
        if P == 0:
            if self.lockstep:
                self._fail_together(None)
            self._idle_until_everyone_is_done(first=True)
            return self._output(n)

        lens, prompt_tokens, prompt_pad = self._layout()
        L = prompt_tokens.shape[1]
        cache = self._cache(N, L + T)
        try:
            with rope_once(self.model, cache):
                logits = self._prefill(cache, lens, prompt_tokens, prompt_pad)
                # after the prefill every row is left-padded in the cache
                cols = torch.arange(L + T)
                key_pad = cols.unsqueeze(0) < (L - lens).repeat_interleave(n).unsqueeze(1)
                cache.expand_rows(P, n)
                if logits is not None and n > 1:
                    logits = logits.repeat_interleave(n, dim=0)
                self._decode(cache, logits, key_pad)
        finally:
            cache.release()
        return self._output(n)

    def _prefill(self, cache, lens, prompt_tokens, prompt_pad):
        """All prompts through the model once, in row chunks of <= max_prefill_tokens tokens (bounds
        the activation peak; megatron's static context writes each chunk at its batch offset)."""
        P, L = prompt_tokens.shape
        rows = max(1, self.max_prefill_tokens // L)
        starts = list(range(0, P, rows))
        chunks = self._max_over_ranks(len(starts))[0] if self.lockstep else len(starts)
        if self.padding_side == "left":
            positions = (torch.arange(L).unsqueeze(0) - (L - lens).unsqueeze(1)).clamp(min=0)
        else:
            positions = torch.arange(L).expand(P, L)
        is_moe = bool(self.model.config.num_moe_experts)
        cache.enable_prefill_mode()
        parts = []
        for c in range(chunks):
            if c >= len(starts):
                self._dummy_forward()  # another expert-parallel rank still has prompts
                continue
            lo, hi = starts[c], min(P, starts[c] + rows)
            pad = prompt_pad[lo:hi]
            padded = bool(pad.any())
            mask = pad.view(hi - lo, 1, 1, L).to(self.device) if padded else None
            if self.padding_side == "right":
                self.runner.last_token_index = (lens[lo:hi] - 1).to(self.device)
            cache.batch_size_offset = lo
            try:
                parts.append(self.runner.forward(
                    prompt_tokens[lo:hi].to(self.device), positions[lo:hi].to(self.device), mask,
                    cache, padding_mask=pad.to(self.device) if padded and is_moe else None))
                if self.recorder is not None:
                    self.recorder.prefill(range(lo, hi), lens[lo:hi], self.padding_side, L)
            finally:
                self.runner.last_token_index = None
        cache.reset_batch_size_offset()
        cache.increment_sequence_len_offset(L)
        if self.padding_side == "right" and bool(prompt_pad.any()):
            cache.shift_rows_right(L - lens, L, rotate=lambda k, s: rotate_keys(self.model, k, s))
        return torch.cat(parts) if parts and parts[0] is not None else None

    # ---------------------------------------------------------------- decode loop
    def _decode(self, cache, logits, key_pad):
        """Sample, record, retire finished rows (their cache rows are refilled from the tail), and
        run the next step on the rows still going. Every sequence is at the same step."""
        runner = self.runner
        N, T = self.out_tokens.shape
        seq_ids = torch.arange(N)            # sequence held by each cache row
        padded_rows = bool(key_pad.any())
        for step in range(T):
            b = len(seq_ids)
            steps = torch.full((b,), step, dtype=torch.long)
            tokens_cpu = self._sample(logits, seq_ids, steps)
            finished = self._finished(tokens_cpu, seq_ids, steps)
            keep = ~finished  # (at the last step every row is finished: the loop returns below)
            if not keep.any():
                self._idle_until_everyone_is_done(first=False, steps_left=T - 1 - step)
                return
            if self.lockstep and not self._anyone_active(True):
                return
            if finished.any():
                holes, movers = _compaction_moves(finished)
                cache.move_rows(movers.to(self.device), holes.to(self.device))
                seq_ids[holes], tokens_cpu[holes] = seq_ids[movers], tokens_cpu[movers]
                key_pad[holes] = key_pad[movers]
                b = int(keep.sum())
                seq_ids, tokens_cpu = seq_ids[:b], tokens_cpu[:b]
                padded_rows = padded_rows and bool(key_pad[:b].any())
            offset = cache.sequence_len_offset
            mask = (key_pad[:b, : offset + 1].view(b, 1, 1, offset + 1).to(self.device)
                    if padded_rows else None)
            positions = torch.full((b, 1), offset, dtype=torch.long, device=self.device)
            cache.enable_decode_mode()
            logits = runner.forward(tokens_cpu.view(b, 1).to(self.device), positions, mask, cache)
            if self.recorder is not None:
                self.recorder.decode(step, seq_ids)
            cache.increment_sequence_len_offset(1)

    def _sample(self, logits, seq_ids, steps) -> torch.Tensor:
        """The next token of every row (row r: sequence seq_ids[r], at response step steps[r]) drawn on
        the sampler rank and shared with the model-parallel group; tokens and log-probs are stored."""
        tokens = logprobs = None
        if self.runner.is_sampler:
            force = None
            if self.forced is not None:  # response_lengths: the last token becomes the stop token
                at_end = self.forced[seq_ids] == steps + 1
                force = torch.where(at_end, self.params.stop_token_ids[0], -1).to(logits.device)
            tokens, logprobs = self.sampler(logits, force)
        tokens, logprobs = self.runner.share(tokens, logprobs, len(seq_ids))
        tokens_cpu = tokens.cpu()
        self.out_tokens[seq_ids, steps] = tokens_cpu
        if logprobs is not None:
            self.out_logprobs[seq_ids, steps] = logprobs.float().cpu()
        return tokens_cpu

    def _finished(self, tokens_cpu, seq_ids, steps) -> torch.Tensor:
        """Which rows are done after the tokens just sampled at response steps `steps` (per row)."""
        T = self.out_tokens.shape[1]
        eos = self.stop.eos_hits(tokens_cpu)
        finished = eos.clone()
        active = (~eos).nonzero().flatten()
        for i in self.stop.string_hits(self.out_tokens, seq_ids[active].tolist(), (steps[active] + 1).tolist()):
            finished[active[i]] = True
            self.reasons[int(seq_ids[active[i]])] = FINISH_STOP_STRING
        for row in eos.nonzero().flatten().tolist():
            self.reasons[int(seq_ids[row])] = FINISH_EOS
        finished |= steps == T - 1  # reasons stay "length" unless set above
        self.lengths[seq_ids[finished]] = steps[finished] + 1
        return finished

    def _fail_together(self, problem: str | None) -> None:
        """Ranks that step together (a model-parallel group; everyone under expert parallelism) must
        all stop when one cannot allocate, or the others would wait for it forever."""
        group = None
        if self.lockstep:
            group = dist.group.WORLD
        elif self.runner.distributed:
            group = self.runner.mp_group
        if group is not None:
            everyone = gather_objects((dist.get_rank(), problem), group)
            failed = [(rank, msg) for rank, msg in everyone if msg is not None]
            if failed and problem is None:
                rank, msg = failed[0]
                problem = f"on rank {rank}: {msg}"
        if problem is not None:
            raise KVCacheTooLarge(problem)

    # ---------------------------------------------------------------- expert-parallel lockstep
    def _max_over_ranks(self, *values: int) -> list[int]:
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def _anyone_active(self, me_active: bool) -> bool:
        flag = torch.tensor([1.0 if me_active else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _idle_until_everyone_is_done(self, first: bool, steps_left: int | None = None):
        """This rank is done; with expert parallelism it keeps joining the others' forwards."""
        if not self.lockstep:
            return
        steps = self.params.max_new_tokens - 1 if steps_left is None else steps_left
        if first:  # the others' prefill chunks
            for _ in range(self._max_over_ranks(0)[0]):
                self._dummy_forward()
        for _ in range(steps):
            if not self._anyone_active(False):
                return
            self._dummy_forward()

    def _dummy_forward(self):
        one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.runner.forward(one, one, None, None)

    def _output(self, n) -> GenerationOutput:
        N = len(self.reasons)
        texts = None
        if self.tokenizer is not None:
            texts = self.tokenizer.batch_decode(
                [self.out_tokens[j, : int(self.lengths[j])].tolist() for j in range(N)],
                skip_special_tokens=True,
            )
            texts = [self.stop.truncate_text(t) if r == FINISH_STOP_STRING else t
                     for t, r in zip(texts, self.reasons)]
        width = int(self.lengths.max()) if N else 0  # a sequence is written only while it runs
        return GenerationOutput(
            tokens=self.out_tokens[:, :width].clone(),
            logprobs=self.out_logprobs[:, :width].clone(),
            lengths=self.lengths,
            finish_reasons=self.reasons,
            prompt_index=[j // n for j in range(N)],
            texts=texts,
        )


def forced_lengths(response_lengths, num_sequences: int, params: SamplingParams) -> torch.Tensor | None:
    """response_lengths as a tensor, checked (None: none forced)."""
    if response_lengths is None:
        return None
    if len(response_lengths) != num_sequences:
        raise ValueError(f"response_lengths has {len(response_lengths)} entries for {num_sequences} sequences "
                         "(prompts x n)")
    if not params.stop_token_ids:
        raise ValueError("response_lengths needs a stop token (SamplingParams.stop_token_ids) to end sequences with")
    if any(r < 1 for r in response_lengths):
        raise ValueError("response_lengths must be >= 1")
    return torch.tensor(list(response_lengths), dtype=torch.long)


def _compaction_moves(finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows to fill (finished rows below the new size) and the live rows above it that fill them."""
    b_new = int((~finished).sum())
    holes = finished[:b_new].nonzero().flatten()
    movers = (~finished[b_new:]).nonzero().flatten() + b_new
    return holes, movers
