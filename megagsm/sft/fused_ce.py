"""Memory-efficient vocab-parallel cross-entropy: the output projection and the loss, fused and
chunked over tokens, so the full [tokens, vocab/tp] fp32 logits never exist at once.

The plain path (GPTModel with `labels`) materialises logits [s, b, V/tp] in the activation dtype, an
fp32 copy inside megatron's `vocab_parallel_cross_entropy`, and keeps the fp32 softmax alive until the
backward: for 8k tokens x 150k vocab that is ~5 GB per copy. Here each chunk of `chunk_size` tokens
computes its logits, the loss of its tokens (with megatron's arithmetic and its three TP all-reduces:
max, target logit, sum of exponentials) and keeps only two floats per token (max, sum of exps).
Gradients, two ways, both exact:
* given the loss mask the losses will be weighted with (what megatron's loss function does), each
  chunk's logit gradient (softmax - one_hot) * mask is formed right away, while the chunk is in
  cache, and turned into grad_hidden and grad_weight; the backward multiplies them by the scalar the
  incoming gradient turns out to be (it checks that it is c * mask). Same three matmuls as the
  plain path, and no [tokens, V] tensor ever: this is also the faster path on CPU.
* otherwise (or if the incoming gradient is not c * mask) the backward recomputes each chunk's
  logits: one extra [tokens, h] x [h, V/tp] matmul.
Peak extra memory: one chunk's logits plus the weight gradient (the plain path holds it too).

megatron-core 0.16.1 has no linear+cross-entropy fusion (its `fused_vocab_parallel_cross_entropy`
still takes full logits) and no GPTModel switch that returns hidden states on the last stage, so
`megagsm.models.output_rows.gpt_hidden_states` runs GPTModel.forward with its post-processing turned
off for the call (the decoder, final norm included, runs as usual; what is skipped is exactly the
output layer + loss).

Use from a megatron schedule: `forward_step_func=chunked_lm_forward_step(chunk_size)` in place of
`megagsm.models.training.lm_forward_step`; it returns the same per-token loss [b, s].
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megagsm.models.output_rows import (enter_output_layer, gpt_hidden_states, output_weight,
                                        scatter_kept_rows)
from megagsm.models.gpt import unwrap_model
from megagsm.models.output_rows import tp_group as _tp_group  # the name tp_group is an argument here


def _logits_grad_(probs, sum_exp, local_target, not_masked, scale):
    """exp(logits - max) -> (softmax - one_hot(target)) * scale, in place, as megatron's backward."""
    probs.div_(sum_exp.unsqueeze(-1))
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, local_target] -= not_masked
    return probs.mul_(scale.unsqueeze(-1))


def _accumulate(grad_logits, h, weight, grad_hidden_rows, grad_weight):
    grad_logits = grad_logits.to(h.dtype)
    if grad_hidden_rows is not None:
        torch.matmul(grad_logits, weight, out=grad_hidden_rows)
    if grad_weight is not None:
        if grad_logits.dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), h)
        else:  # accumulated in fp32 across chunks whatever the weight dtype
            grad_weight += torch.matmul(grad_logits.t(), h).float()


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """loss[i] = logsumexp_v(h_i . w_v) - h_i . w_target(i), v over the whole (TP-split) vocabulary.

    With `token_weights` (the loss mask the caller multiplies the losses by) the gradients for an
    incoming gradient of c * token_weights are formed in the forward pass, while each chunk's logits
    are still in cache, and the backward only scales them by c: three matmuls per chunk as in the
    plain path, no recompute. Any other incoming gradient takes the recompute path (exact either way).
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weights, chunk_size, tp_group, need_hidden, need_weight):
        n = hidden.shape[0]
        vocab_local = weight.shape[0]
        tp_size = tp_group.size() if tp_group is not None else 1
        tp_rank = tp_group.rank() if tp_group is not None else 0
        start = tp_rank * vocab_local
        # as megatron: a target outside this rank's vocab range contributes 0 to the target logit
        target_mask = (target < start) | (target >= start + vocab_local)
        local_target = (target - start).masked_fill(target_mask, 0)
        not_masked = (~target_mask).float()
        logits_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sum_exp = torch.empty_like(logits_max)
        loss = torch.empty_like(logits_max)
        precompute = token_weights is not None and (need_hidden or need_weight)
        grad_hidden = torch.empty_like(hidden) if precompute and need_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if precompute and need_weight else None)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            h = hidden[lo:hi]
            logits = torch.matmul(h, weight.t()).float()
            chunk_max = logits.max(dim=-1)[0]
            if tp_size > 1:
                dist.all_reduce(chunk_max, op=dist.ReduceOp.MAX, group=tp_group)
            logits.sub_(chunk_max.unsqueeze(-1))
            predicted = logits.gather(1, local_target[lo:hi].unsqueeze(-1)).squeeze(-1)
            predicted.masked_fill_(target_mask[lo:hi], 0.0)
            chunk_sum = logits.exp_().sum(dim=-1)
            if tp_size > 1:
                both = torch.stack([predicted, chunk_sum])
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
                predicted, chunk_sum = both[0], both[1]
            loss[lo:hi] = torch.log(chunk_sum) - predicted
            logits_max[lo:hi] = chunk_max
            sum_exp[lo:hi] = chunk_sum
            if precompute:
                grad_logits = _logits_grad_(logits, chunk_sum, local_target[lo:hi], not_masked[lo:hi],
                                            token_weights[lo:hi])
                _accumulate(grad_logits, h, weight,
                            grad_hidden[lo:hi] if grad_hidden is not None else None, grad_weight)
            del logits
        ctx.save_for_backward(hidden, weight, local_target, not_masked, logits_max, sum_exp, token_weights)
        ctx.chunk_size = chunk_size
        ctx.precomputed = (grad_hidden, grad_weight) if precompute else None
        ctx.need = (need_hidden, need_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_target, not_masked, logits_max, sum_exp, token_weights = ctx.saved_tensors
        need_hidden, need_weight = ctx.need
        grad_loss = grad_loss.float()
        if ctx.precomputed is not None:
            scale = _common_scale(grad_loss, token_weights)
            if scale is not None:
                grad_hidden, grad_weight = ctx.precomputed
                ctx.precomputed = None
                if scale != 1.0:
                    grad_hidden = grad_hidden.mul_(scale) if grad_hidden is not None else None
                    grad_weight = grad_weight.mul_(scale) if grad_weight is not None else None
                if grad_weight is not None:
                    grad_weight = grad_weight.to(weight.dtype)
                return grad_hidden, grad_weight, None, None, None, None, None, None
        ctx.precomputed = None
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_weight else None)
        for lo in range(0, n, ctx.chunk_size):
            hi = min(n, lo + ctx.chunk_size)
            h = hidden[lo:hi]
            probs = torch.matmul(h, weight.t()).float()
            probs.sub_(logits_max[lo:hi].unsqueeze(-1)).exp_()
            grad_logits = _logits_grad_(probs, sum_exp[lo:hi], local_target[lo:hi], not_masked[lo:hi],
                                        grad_loss[lo:hi])
            _accumulate(grad_logits, h, weight,
                        grad_hidden[lo:hi] if grad_hidden is not None else None, grad_weight)
            del probs, grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _common_scale(grad_loss, token_weights) -> float | None:
    """c when grad_loss == c * token_weights exactly (megatron's masked sum times the loss scale),
    else None."""
    if token_weights.numel() == 0:
        return 1.0
    pivot = int(torch.argmax(token_weights.abs()))
    if token_weights[pivot] == 0:
        return 0.0 if not grad_loss.any() else None
    scale = float(grad_loss[pivot] / token_weights[pivot])
    return scale if torch.equal(grad_loss, token_weights * scale) else None


def chunked_vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    sequence_parallel: bool = False,
    tp_group=None,
    loss_mask: torch.Tensor | None = None,
    loss_tokens_only: bool = False,
) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of `labels` [b, s] under logits = hidden @ output_weight.T.

    hidden: [s, b, h] decoder output (final norm applied), [s/tp, b, h] with sequence_parallel;
    output_weight: this rank's vocab shard [V/tp, h] (`output_layer.weight`, or the embedding for
    tied weights). Equal (values and gradients) to the output layer + megatron's
    `tensor_parallel.vocab_parallel_cross_entropy` on full logits, with at most `chunk_size` tokens'
    logits alive at a time. The input enters the TP region as megatron's ColumnParallelLinear would
    take it (identity / all-reduce of its gradient, or the sequence all-gather with SP).

    loss_mask [b, s] (optional): the weights the caller multiplies the per-token losses by. When
    given, gradients are formed in the forward pass (no recompute, see the Function's docstring).

    loss_tokens_only (needs loss_mask): the output projection and the loss run only on tokens with a
    non-zero loss_mask; the others get loss 0 (SFT's prompt tokens: typically a third or more of a
    GSM8K batch, and the output projection is a quarter of a small model's matmul FLOPs). The gradient
    is unchanged for any upstream gradient that is 0 on those tokens (megatron's masked sum); any
    other raises in the backward. TP ranks share the batch, so they skip the same rows."""
    if chunk_size < 1:
        raise ValueError(f"train.loss_chunk_size must be >= 1, got {chunk_size}")
    hidden = enter_output_layer(hidden, sequence_parallel, tp_group)
    group = _tp_group(tp_group)
    if group is not None and group.size() == 1:
        group = None  # the Function skips its all-reduces
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states [s={s}, b={b}]")
    # bf16 runs: Float16Module hands the last stage's output back in fp32; the logits are computed
    # in the weight's dtype as megatron's output layer does (the round trip is exact)
    hidden = hidden.to(output_weight.dtype).reshape(s * b, h)
    target = labels.transpose(0, 1).reshape(s * b)
    need_hidden = torch.is_grad_enabled() and hidden.requires_grad
    need_weight = torch.is_grad_enabled() and output_weight.requires_grad
    token_weights = None
    if loss_mask is not None:
        if loss_mask.shape != (b, s):
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != labels shape {(b, s)}")
        token_weights = loss_mask.transpose(0, 1).reshape(s * b).float()
    if loss_tokens_only and token_weights is None:
        raise ValueError("loss_tokens_only=True needs the loss_mask")
    kept = token_weights.nonzero().squeeze(1) if loss_tokens_only else None
    if kept is not None and kept.numel() < s * b:
        kept_losses = _ChunkedVocabParallelCrossEntropy.apply(
            hidden.index_select(0, kept), output_weight, target.index_select(0, kept),
            token_weights.index_select(0, kept), chunk_size, group, need_hidden, need_weight)
        loss = scatter_kept_rows(kept_losses, kept, s * b)
    else:
        loss = _ChunkedVocabParallelCrossEntropy.apply(hidden, output_weight, target, token_weights,
                                                       chunk_size, group, need_hidden, need_weight)
    return loss.view(s, b).transpose(0, 1).contiguous()


def chunked_lm_loss(model, tokens, position_ids, attention_mask, labels, chunk_size: int,
                    loss_mask: torch.Tensor | None = None, loss_tokens_only: bool = False,
                    packed_seq_params=None):
    """Per-token loss [b, s] on the last pipeline stage (what `model(..., labels=labels)` returns,
    computed chunk-wise); other stages return their hidden states for the next stage. Pass the
    loss mask the losses will be weighted with to have the gradients formed in the forward pass,
    and loss_tokens_only to skip the output projection for tokens outside it (their loss is 0).
    packed_seq_params: a THD microbatch's documents (megagsm.models.packed_seq)."""
    gpt = unwrap_model(model)
    packed = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
    if not gpt.post_process:
        return model(tokens, position_ids, attention_mask, **packed)
    hidden = gpt_hidden_states(model, tokens, position_ids, attention_mask, **packed)
    return chunked_vocab_parallel_cross_entropy(
        hidden, output_weight(model), labels, chunk_size,
        sequence_parallel=gpt.output_layer.sequence_parallel,
        tp_group=gpt.output_layer.tp_group,
        loss_mask=loss_mask,
        loss_tokens_only=loss_tokens_only,
    )


def chunked_lm_forward_step(chunk_size: int, loss_tokens_only: bool = True):
    """A megatron forward_step_func like `megagsm.models.training.lm_forward_step`, with the chunked
    loss. Batch dict: tokens, position_ids, labels, loss_mask, optional attention_mask and
    packed_seq_params. The loss
    function weights the losses by loss_mask, so by default tokens outside it skip the output
    projection (`loss_tokens_only`; the reported loss and every gradient are the same)."""
    from megagsm.models.training import masked_token_loss

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = chunked_lm_loss(model, batch["tokens"], batch["position_ids"],
                                 batch.get("attention_mask"), batch["labels"], chunk_size,
                                 loss_mask=batch["loss_mask"], loss_tokens_only=loss_tokens_only,
                                 packed_seq_params=batch.get("packed_seq_params"))
        return output, partial(masked_token_loss, batch["loss_mask"])

    return forward_step
