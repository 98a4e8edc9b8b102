"""More prompts than fit one KV cache: generate() over consecutive groups of prompts."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.generation.engine import GenerationOutput, generate
from megagsm.generation.sampling import SamplingParams
from megagsm.runtime.collectives import reduce_numbers


def generate_batched(
    model,
    prompts_token_ids: list[list[int]],
    params: SamplingParams,
    tokenizer=None,
    *,
    max_batch_size: int = 64,
    response_lengths: list[int] | None = None,
    **kwargs,
) -> GenerationOutput:
    """generate() on groups of prompts whose sequences (prompts x n) number <= max_batch_size; the
    outputs are concatenated in prompt order. With expert parallelism every rank runs the same
    number of groups (a rank out of prompts joins with empty groups). response_lengths: per
    sequence of the whole call (engine.generate), split with the groups."""
    per_group = max(1, max_batch_size // params.n)
    starts = range(0, len(prompts_token_ids), per_group)
    groups = [prompts_token_ids[i: i + per_group] for i in starts]
    lengths = [None if response_lengths is None else
               list(response_lengths[i * params.n: (i + len(g)) * params.n]) for i, g in zip(starts, groups)]
    if response_lengths is not None and len(response_lengths) != len(prompts_token_ids) * params.n:
        raise ValueError(f"response_lengths has {len(response_lengths)} entries for "
                         f"{len(prompts_token_ids) * params.n} sequences (prompts x n)")
    if dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1:
        count = int(reduce_numbers([len(groups)], "max")[0])
        lengths += [None if response_lengths is None else [] for _ in range(count - len(groups))]
        groups += [[] for _ in range(count - len(groups))]
    outputs = [generate(model, g, params, tokenizer, response_lengths=r, **kwargs)
               for g, r in zip(groups, lengths)]
    return concat_outputs(outputs, [len(g) for g in groups], kwargs.get("pad_token_id", 0))


def concat_outputs(outputs: list[GenerationOutput], prompts_per_output: list[int],
                   pad_token_id: int = 0) -> GenerationOutput:
    """One output from several, prompt indices renumbered as if they had been one call."""
    if not outputs:
        raise ValueError("nothing to concatenate")
    pairs = [(o, c) for o, c in zip(outputs, prompts_per_output) if c > 0]
    if not pairs:
        return outputs[0]
    width = max(o.tokens.shape[1] for o, _ in pairs)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    first_prompt, index = 0, []
    for o, count in pairs:
        index += [first_prompt + i for i in o.prompt_index]
        first_prompt += count
    texts = None if any(o.texts is None for o, _ in pairs) else [t for o, _ in pairs for t in o.texts]
    routing = None if any(o.routing is None for o, _ in pairs) else [r for o, _ in pairs for r in o.routing]
    return GenerationOutput(
        tokens=torch.cat([pad(o.tokens, pad_token_id) for o, _ in pairs]),
        logprobs=torch.cat([pad(o.logprobs, 0.0) for o, _ in pairs]),
        lengths=torch.cat([o.lengths for o, _ in pairs]),
        finish_reasons=[r for o, _ in pairs for r in o.finish_reasons],
        prompt_index=index,
        texts=texts,
        routing=routing,
    )
