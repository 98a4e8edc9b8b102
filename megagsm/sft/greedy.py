"""A minimal greedy decoder (full recompute, no KV cache) used for accuracy evaluation only when the
generation engine (`megagsm.generation`) is not installed in this checkout. Supports tensor and data
parallelism, not pipeline parallelism.

Prompts are left-padded; a boolean attention mask hides the padding. megatron's RoPE numbers
positions 0..s-1 whatever position_ids say, but rotary attention scores depend only on relative
offsets, so a left-padded prompt scores exactly like the unpadded one.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps


@torch.no_grad()
def greedy_generate(model_chunks: list, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                    pad_id: int, batch_size: int = 8, vocab_limit: int | None = None) -> list[list[int]]:
    """Greedy completions (EOS excluded) for every prompt; collective over the model-parallel group.
    vocab_limit: ignore logits of (padded) vocabulary rows at or beyond it."""
    if ps.get_pipeline_model_parallel_world_size() > 1 or len(model_chunks) > 1:
        raise NotImplementedError("the fallback greedy decoder does not support pipeline parallelism; "
                                  "install the generation engine (megagsm.generation)")
    model = model_chunks[0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            outputs += _generate_batch(model, prompts[start:start + batch_size], max_new_tokens, eos_id,
                                       pad_id, device, vocab_limit)
    finally:
        model.train(was_training)
    return outputs


def _generate_batch(model, prompts, max_new_tokens, eos_id, pad_id, device, vocab_limit) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    # sequence parallelism splits the sequence over TP ranks: keep its length a multiple of tp
    multiple = ps.get_tensor_model_parallel_world_size() if model.config.sequence_parallel else 1
    for _ in range(max_new_tokens):
        extra = (-tokens.shape[1]) % multiple
        inputs = torch.cat([torch.full_like(tokens[:, :extra], pad_id), tokens], dim=1)
        visible = torch.cat([torch.zeros_like(real[:, :extra]), real], dim=1)
        seq = inputs.shape[1]
        # True = may not attend (megatron's convention): padding keys, and the future
        forbidden = ~visible[:, None, None, :] | torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
        position_ids = torch.arange(seq, device=device).expand_as(inputs)
        logits = model(inputs, position_ids, forbidden, runtime_gather_output=True)
        next_token = logits[:, -1, :vocab_limit].float().argmax(dim=-1)
        if eos_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
        generated.append(next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
        if eos_id is not None:
            done |= next_token == eos_id
            if bool(done.all()):
                break
    steps = torch.stack(generated, dim=1).tolist()
    out = []
    for row in steps:
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        out.append(row)
    return out
