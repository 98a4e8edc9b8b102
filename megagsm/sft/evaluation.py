"""Evaluation during SFT: validation loss on held-out samples, and GSM8K accuracy by greedy generation
scored with the GSM8K reward (`megagsm.rewards.gsm8k.compute_score`, strict: the number after `####`).

Accuracy takes a `generate_fn(prompts, max_new_tokens) -> completions` (token ids in, token ids out,
EOS excluded), so any decoder can be plugged in: the generation engine when installed, else the
small fallback in `megagsm.sft.greedy`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.config.data import DataConfig
from megagsm.config.generation import GenerationConfig
from megagsm.data.prompts import encode_prompt
from megagsm.models.training import eval_step
from megagsm.rewards.gsm8k import compute_score
from megagsm.utils.logging import get_logger

log = get_logger(__name__)

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


@dataclass
class AccuracyResult:
    accuracy: float
    num_examples: int
    samples: list[dict] = field(default_factory=list)  # a few (question, completion, reference) rows


def validation_loss(model_chunks, microbatches: list[dict], seq_length: int, micro_batch_size: int,
                    forward_step_func) -> float | None:
    if not microbatches:
        return None
    loss, _ = eval_step(model_chunks, microbatches, len(microbatches), seq_length, micro_batch_size,
                        forward_step_func=forward_step_func)
    return loss


def make_generate_fn(model_chunks, tokenizer, generation: GenerationConfig) -> GenerateFn:
    """Greedy decoding through the generation engine when it is installed, else the fallback.
    Logits beyond the tokenizer's vocabulary (megatron pads it) are never chosen."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    vocab = len(tokenizer)
    engine = _engine_generate_fn(model_chunks, eos_id, pad_id, vocab, generation)
    if engine is not None:
        return engine
    from megagsm.sft.greedy import greedy_generate

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return greedy_generate(model_chunks, prompts, max_new_tokens, eos_id, pad_id,
                               batch_size=generation.max_batch_size, vocab_limit=vocab)

    return generate


def _engine_generate_fn(model_chunks, eos_id, pad_id, vocab, generation: GenerationConfig) -> GenerateFn | None:
    try:
        from megagsm.generation import SamplingParams, generate_batched  # branch `generate`
    except ImportError:
        return None
    if len(model_chunks) != 1:
        return None  # interleaved pipeline chunks: not supported by the engine

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0, n=1,
                                stop_token_ids=() if eos_id is None else (eos_id,), logprobs="none")
        out = generate_batched(model_chunks[0], prompts, params, max_batch_size=generation.max_batch_size,
                               pad_token_id=pad_id, vocab_limit=vocab)
        completions = [[] for _ in prompts]
        for row, prompt in enumerate(out.prompt_index):
            ids = out.tokens[row, : int(out.lengths[row])].tolist()
            completions[prompt] = [t for t in ids if t != eos_id]
        return completions

    return generate


def gsm8k_accuracy(examples: list, tokenizer, generate_fn: GenerateFn, data: DataConfig,
                   max_new_tokens: int, method: str = "strict", keep_samples: int = 3) -> AccuracyResult:
    """Exact-answer accuracy over `examples`, sharded over data-parallel ranks (collective)."""
    dp_rank = ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0
    dp_size = ps.get_data_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    mine = list(range(dp_rank, len(examples), dp_size))
    # every DP rank runs the same number of generate calls (collectives inside the model)
    prompts = [encode_prompt(examples[i].question, tokenizer, data.prompt_template) for i in mine]
    completions = generate_fn(prompts, max_new_tokens) if prompts else []
    correct = 0.0
    samples = []
    for i, completion in zip(mine, completions):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        score = compute_score(text, examples[i].final_answer, method=method)
        correct += score
        if len(samples) < keep_samples:
            samples.append({"question": examples[i].question, "completion": text,
                            "reference": examples[i].final_answer, "score": score})
    totals = torch.tensor([correct, float(len(mine))], dtype=torch.float64)
    if dist.is_initialized() and dp_size > 1:
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
    n = int(totals[1].item())
    return AccuracyResult(totals[0].item() / max(n, 1), n, samples)
