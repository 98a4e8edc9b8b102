"""One forward step of a megatron GPTModel during generation, across pipeline stages, and the
per-step exchange of sampled tokens.

Pipeline parallelism uses the simplest schedule that is correct for decoding: stage k receives the
hidden states [s, b, h] of stage k-1 (torch.distributed point-to-point), runs its layers with its own
part of the KV cache, and sends its output on; the last stage turns the last position into logits.
Stages therefore work one after another (no micro-batch overlap). The last stage's first tensor-
parallel rank samples and broadcasts the tokens (and their log-probs) to every rank of the model-
parallel group (TP x PP), so every rank runs identical bookkeeping (finished rows, compaction).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.runtime.collectives import gather_objects


class StageRunner:
    def __init__(self, model, config):
        self.model = model
        self.config = config
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.hidden = config.hidden_size
        self.pipe_dtype = config.pipeline_dtype or config.params_dtype
        self.distributed = dist.is_initialized() and ps.get_model_parallel_group() is not None and (
            dist.get_world_size(ps.get_model_parallel_group()) > 1
        )
        if self.distributed:
            self.mp_group = ps.get_model_parallel_group()
            self.sampler_rank = _sampler_rank(self.mp_group)  # the one rank that samples
        else:
            self.mp_group, self.sampler_rank = None, 0
        self.is_sampler = (not self.distributed) or dist.get_rank() == self.sampler_rank
        self.device = next(model.parameters()).device
        self.last_token_index: torch.Tensor | None = None  # per-row position to take logits from
        self._hook = None
        if self.last:
            self._hook = model.decoder.register_forward_hook(self._pick_last_tokens)

    def close(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pick_last_tokens(self, module, args, output):
        # GPTModel keeps only hidden_states[-1:] for the logits during inference; with right-padded
        # prompts each row's last real token is elsewhere, so move it to the last position first.
        if self.last_token_index is None:
            return output
        rows = torch.arange(output.shape[1], device=output.device)
        last = output[self.last_token_index, rows]
        return torch.cat([output[:-1], last.unsqueeze(0)], dim=0)

    def forward(self, tokens, positions, attention_mask, context, padding_mask=None, last_only=True):
        """tokens/positions [b, s] (needed on the first stage). Returns logits [b, V] of the last
        position ([b, s, V] of all with last_only=False) on the last stage, None elsewhere."""
        b, s = tokens.shape
        if not self.first:
            recv = torch.empty(s, b, self.hidden, dtype=self.pipe_dtype, device=self.device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(recv)
        # the attention layers pick a mask type transformer-engine honours when a mask is given
        # (generation.rope_cache.generation_mask_type)
        if context is not None:
            context.key_padding = attention_mask is not None
        out = self.model(
            tokens if self.first else None,
            positions if self.first else None,
            attention_mask,
            inference_context=context,
            runtime_gather_output=True,
            padding_mask=padding_mask,
        )
        if not self.last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out[:, -1, :] if last_only else out

    def share(self, tokens: torch.Tensor | None, logprobs: torch.Tensor | None, b: int):
        """Broadcasts the sampler rank's (tokens, logprobs) [b] to the model-parallel group."""
        if not self.distributed:
            return tokens, logprobs
        packed = torch.empty(2, b, dtype=torch.float64, device=self.device)
        if self.is_sampler:
            packed[0] = tokens.to(torch.float64)  # token ids are exact in float64
            packed[1] = logprobs.to(torch.float64) if logprobs is not None else 0.0
        dist.broadcast(packed, src=self.sampler_rank, group=self.mp_group)
        return packed[0].long(), packed[1].float()


def _sampler_rank(group) -> int:
    """Global rank of the first tensor-parallel rank of the last pipeline stage in `group`."""
    me = (dist.get_rank(), ps.is_pipeline_last_stage(ignore_virtual=True),
          ps.get_tensor_model_parallel_rank())
    everyone = gather_objects(me, group)
    return min(rank for rank, last, tp_rank in everyone if last and tp_rank == 0)


@contextlib.contextmanager
def sequence_parallel_off(model, config):
    """Sequence parallelism splits activations along the sequence over TP ranks; a decoding step
    has one position, so generation runs with it off (same weights: SP only changes collectives)."""
    if not config.sequence_parallel:
        yield
        return
    saved = []
    for module in model.modules():
        for attr in ("sequence_parallel", "reduce_scatter_embeddings"):
            if isinstance(getattr(module, attr, None), bool):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, False)
    config.sequence_parallel = False
    try:
        yield
    finally:
        config.sequence_parallel = True
        for module, attr, value in saved:
            setattr(module, attr, value)
