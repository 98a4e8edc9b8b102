"""The last pipeline stage's output layer, on chosen positions only: GPTModel's decoder output without
its logits, the output projection's weight, and the projection of the kept rows, with a scatter back
whose backward refuses gradients for rows that were never computed. Used by the SFT chunked loss
(loss tokens only) and by GSPO (response tokens only).

megatron-core 0.16.1 has no GPTModel switch that returns hidden states on the last stage, so
`gpt_hidden_states` runs GPTModel.forward with its post-processing turned off for the call (the
decoder, final norm included, runs as usual; what is skipped is exactly the output layer + loss).
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megagsm.models.gpt import unwrap_model


def tp_group(group=None):
    """The given group, else megatron's tensor-parallel group (None before parallel_state exists)."""
    if group is not None:
        return group
    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def enter_output_layer(hidden: torch.Tensor, sequence_parallel: bool, group=None) -> torch.Tensor:
    """The decoder output as megatron's ColumnParallelLinear output layer takes it in: the sequence
    all-gather under sequence parallelism, else identity forward / gradient all-reduce; unchanged at TP1."""
    group = tp_group(group)
    if group is None or group.size() == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, True, group=group)
    return copy_to_tensor_model_parallel_region(hidden, group=group)


@contextlib.contextmanager
def _without_output_layer(gpt):
    """GPTModel.forward returns the decoder's hidden states while active (see module docstring)."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def gpt_hidden_states(model, tokens, position_ids, attention_mask, **forward_kwargs) -> torch.Tensor:
    """Decoder output [s, b, h] ([s/tp, b, h] with sequence parallelism) of a (wrapped) GPTModel,
    without computing logits. Called through the wrappers so their hooks and casts still apply."""
    gpt = unwrap_model(model)
    if gpt.config.mtp_num_layers:
        raise ValueError("the output layer on selected tokens (train.loss=chunked, GSPO) does not support "
                         "multi-token prediction layers (mtp_num_layers)")
    with _without_output_layer(gpt):
        return model(tokens, position_ids, attention_mask, **forward_kwargs)


def output_weight(model) -> torch.Tensor:
    """The output projection [V/tp, h] of the last stage (the embedding when weights are tied)."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _ScatterKeptRows(torch.autograd.Function):
    """Values of the kept tokens -> a value per token, 0 for the skipped ones. Theirs were never
    computed, so a gradient arriving for one of them would be silently dropped: the backward refuses it
    (a masked sum sends exactly 0 there)."""

    @staticmethod
    def forward(ctx, kept_values, kept, n):
        ctx.save_for_backward(kept)
        return kept_values.new_zeros(n).index_copy_(0, kept, kept_values)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        kept_grad = grad.index_select(0, kept)
        if torch.count_nonzero(grad) != torch.count_nonzero(kept_grad):
            raise RuntimeError("a masked-out token received a gradient, but its value was never computed "
                               "(only the mask's tokens are, e.g. loss_tokens_only=True); weight the "
                               "per-token values by the mask")
        return kept_grad, None, None


def scatter_kept_rows(values: torch.Tensor, kept: torch.Tensor, n: int) -> torch.Tensor:
    """[len(kept)] -> [n] with zeros elsewhere; differentiable, and a non-zero gradient on a row that
    was not kept raises (see _ScatterKeptRows)."""
    return _ScatterKeptRows.apply(values, kept, n)


def output_layer_rows(model, hidden: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocab-parallel logits [n, V/tp] of the positions where keep [b, s] is true (or of the [n] row
    indices keep holds, repeats allowed), from the decoder output hidden [s, b, h] ([s/tp, b, h] under
    sequence parallelism) of a (wrapped) GPTModel's last stage, and their row indices in the [s * b]
    (sequence-major) flattening. The input enters the TP region as megatron's output layer would take
    it (copy / sequence all-gather), then only the kept rows are multiplied: the output projection is
    skipped for the others."""
    gpt = unwrap_model(model)
    hidden = enter_output_layer(hidden, gpt.output_layer.sequence_parallel, gpt.output_layer.tp_group)
    weight = output_weight(model)
    s, b, h = hidden.shape
    kept = keep if keep.dtype != torch.bool else keep.transpose(0, 1).reshape(s * b).nonzero().squeeze(1)
    rows = hidden.reshape(s * b, h).index_select(0, kept).to(weight.dtype)
    return torch.matmul(rows, weight.t()), kept
