"""Held-out accuracy during training: greedy completions from the model being trained (the generation
engine, same weights), scored with the GSM8K reward (`megagsm.rewards.gsm8k.compute_score`; strict:
the number after `####`). Sharded over data-parallel ranks; collective."""
from __future__ import annotations

from dataclasses import dataclass, field

from megagsm.config.data import DataConfig
from megagsm.config.generation import GenerationConfig
from megagsm.data.prompts import encode_prompt
from megagsm.generation import SamplingParams, generate_batched
from megagsm.rewards.gsm8k import compute_score
from megagsm.runtime.collectives import dp_group, dp_rank_and_size, reduce_numbers


@dataclass
class AccuracyResult:
    accuracy: float
    num_examples: int
    samples: list[dict] = field(default_factory=list)  # a few (question, completion, reference) rows


def greedy_completions(model_chunks: list, prompts: list[list[int]], tokenizer, generation: GenerationConfig,
                       max_new_tokens: int) -> list[list[int]]:
    """Greedy completions (token ids, EOS dropped) in prompt order. Logits beyond the tokenizer's
    vocabulary (megatron pads it) are never chosen."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, temperature=0.0, n=1,
                            stop_token_ids=() if eos_id is None else (eos_id,), logprobs="none")
    out = generate_batched(model_chunks, prompts, params, max_batch_size=generation.max_batch_size,
                           pad_token_id=pad_id, vocab_limit=len(tokenizer))
    completions: list[list[int]] = [[] for _ in prompts]
    for row, prompt in enumerate(out.prompt_index):
        ids = out.tokens[row, : int(out.lengths[row])].tolist()
        completions[prompt] = [t for t in ids if t != eos_id]
    return completions


def greedy_accuracy(model_chunks: list, examples: list, tokenizer, data: DataConfig, generation: GenerationConfig,
                    method: str = "strict", keep_samples: int = 3) -> AccuracyResult:
    """Exact-answer accuracy over `examples`, sharded over data-parallel ranks (collective)."""
    dp_rank, dp_size = dp_rank_and_size()
    mine = list(range(dp_rank, len(examples), dp_size))
    prompts = [encode_prompt(examples[i].question, tokenizer, data.prompt_template) for i in mine]
    completions = greedy_completions(model_chunks, prompts, tokenizer, generation,
                                     generation.max_new_tokens) if prompts else []
    correct = 0.0
    samples = []
    for i, completion in zip(mine, completions):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        score = compute_score(text, examples[i].final_answer, method=method)
        correct += score
        if len(samples) < keep_samples:
            samples.append({"question": examples[i].question, "completion": text,
                            "reference": examples[i].final_answer, "score": score})
    total_correct, total = reduce_numbers([correct, float(len(mine))], "sum", dp_group())
    return AccuracyResult(total_correct / max(int(total), 1), int(total), samples)
