"""Full-vocabulary logits of a (possibly TP/PP-split) megatron GPT model for a token batch, on every
rank. For parity checks and small evaluations: one forward-only pass through megatron's pipeline
schedule, TP-gathered logits, broadcast from the last pipeline stage."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.models.training import run_schedule
from megagsm.runtime.collectives import broadcast_object


@torch.no_grad()
def forward_logits(model_chunks, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """tokens: [batch, seq] int64. Returns fp32 logits [batch, seq, vocab] (cut to vocab_size, which
    drops megatron's padded vocabulary columns) on every rank."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for c in chunks:
        c.eval()
    device = next(p.device for c in chunks for p in c.parameters())
    tokens = tokens.to(device)
    batch, seq = tokens.shape
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)

    def step(data_iterator, model):
        ids = next(data_iterator)
        out = model(ids, positions, None, runtime_gather_output=True)
        return out, lambda output, non_loss_data=False: output

    collected = run_schedule(list(chunks), [tokens], 1, seq, batch, step, forward_only=True,
                             collect_non_loss_data=True)
    padded = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits = collected[0].float()
        padded = logits.shape[-1]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        last = ps.get_pipeline_model_parallel_last_rank()
        size = broadcast_object(padded, src=last, group=group)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            logits = torch.empty(batch, seq, size, dtype=torch.float32, device=device)
        dist.broadcast(logits, src=last, group=group)
    return logits[..., :vocab_size] if vocab_size is not None else logits
