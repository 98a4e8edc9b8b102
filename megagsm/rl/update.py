"""The policy update through megatron's schedules: log-prob passes and GSPO mini-batch steps.

Loss normalisation. ``train_step`` runs megatron with ``calculate_per_token_loss``: each microbatch's
loss function returns ``(loss_sum, count, report)``, the schedule back-propagates ``loss_sum``
unscaled, and ``finalize_model_grads`` divides every gradient once by the global sum of ``count``
(over microbatches and DP ranks). The GSPO loss is ``(1/S) sum_i loss_i`` over the ``S`` sequences
of a mini-batch (seq-mean-token-mean: ``loss_i`` is sequence ``i``'s token mean), so a microbatch
returns ``sum_i loss_i`` over its sequences (``policy_loss(..., num_seqs=1)``) with ``count`` = its
number of sequences; token-mean returns the token sum with ``count`` = its tokens. The result is the
exact global mean whatever the split into microbatches, DP ranks or pipeline stages, and a sequence's
own mean never crosses a microbatch (rows are whole sequences; context parallelism, which would split
them, is rejected by the trainer).

Old log-probs are recomputed by a forward-only pass over the very microbatches the update then uses
(same shapes, same kernels, same order), so on the first mini-batch of the first epoch the ratio is
exactly 1 and the clip range (3e-4 for GSPO) measures only what the updates moved. The sampler's own
log-probs (KV-cache decoding, other batch shapes) agree only to float rounding; their distance to the
recomputed ones is reported as ``logprob_diff_gen``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megagsm.models.training import run_schedule, train_step
from megagsm.rl.batching import MiniBatch, comm_device
from megagsm.models.output_rows import gpt_hidden_states, output_layer_rows, scatter_kept_rows, unwrap_gpt
from megagsm.rl.logprobs import token_entropy, token_log_probs
from megagsm.rl.losses import policy_loss


@dataclass(frozen=True)
class LossSpec:
    mode: str = "gspo"
    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"
    kl_coef: float = 0.0
    temperature: float = 1.0
    vocab_limit: int | None = None
    norm: float | None = None           # seq-mean-token-sum-norm's constant (max response length)

    @property
    def per_token(self) -> bool:
        return self.loss_agg_mode == "token-mean"


class MetricSums:
    """Weighted sums of per-microbatch metrics: {name: [sum of value * weight, sum of weight]}, kept as
    tensors so that accumulating them costs no device synchronisation."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, name: str, value, weight) -> None:
        weight = torch.as_tensor(weight).detach().double()
        value = torch.as_tensor(value).detach().double()
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + value * weight
        entry[1] = entry[1] + weight

    def reduce(self, names: list[str]) -> dict[str, float]:
        """Means over DP ranks, taken on the last pipeline stage and shared with every rank. ``names``
        must be the same list on every rank (absent ones count as empty)."""
        t = torch.tensor([[float(x) for x in self.sums.get(n, [0.0, 0.0])] for n in names],
                         dtype=torch.float64, device=comm_device()).view(-1)
        if dist.is_initialized() and ps.model_parallel_is_initialized():
            dist.all_reduce(t, group=ps.get_data_parallel_group())
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
        t = t.cpu().view(-1, 2)
        return {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(names) if t[i, 1] > 0}


def _model_forward(batch: dict, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last stage: (vocab-parallel logits [n, V/tp] of the n response positions, their rows in the
    sequence-major [s * b] flattening): prompt and padding positions skip the output projection, as
    every loss here is masked by response_mask. Other stages: (hidden states, None)."""
    gpt = unwrap_gpt(model)
    if not gpt.post_process:
        return model(batch["tokens"], batch["position_ids"], None), None
    hidden = gpt_hidden_states(model, batch["tokens"], batch["position_ids"], None)
    return output_layer_rows(model, hidden, batch["response_mask"] > 0)


def _per_position(values: torch.Tensor, kept: torch.Tensor, batch: dict) -> torch.Tensor:
    """[n] values of the response positions -> [b, s], 0 elsewhere."""
    b, s = batch["labels"].shape
    return scatter_kept_rows(values, kept, s * b).view(s, b).transpose(0, 1)


def _response_log_probs(output: torch.Tensor, kept: torch.Tensor, batch: dict, spec: LossSpec) -> torch.Tensor:
    labels = batch["labels"].transpose(0, 1).reshape(-1).index_select(0, kept)
    return _per_position(token_log_probs(output, labels, spec.temperature, spec.vocab_limit), kept, batch)


def _logprob_loss(batch: dict, spec: LossSpec, key: str, sums: MetricSums | None, kept: torch.Tensor,
                  output: torch.Tensor):
    log_prob = _response_log_probs(output, kept, batch, spec)
    batch[key] = log_prob.detach()
    mask = batch["response_mask"]
    tokens = mask.sum()
    if sums is not None:
        entropy = _per_position(token_entropy(output, spec.temperature, spec.vocab_limit), kept, batch)
        sums.add("entropy", (entropy * mask).sum() / tokens.clamp(min=1), tokens)
        diff = ((log_prob.detach() - batch["gen_log_prob"]).abs() * mask).sum() / tokens.clamp(min=1)
        sums.add("logprob_diff_gen", diff, tokens)
    return torch.zeros((), device=output.device), tokens.to(torch.int), {}


def logprob_forward_step(data_iterator, model, *, spec: LossSpec, key: str, sums: MetricSums | None):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model)
    return output, partial(_logprob_loss, batch, spec, key, sums, kept)


@torch.no_grad()
def compute_log_probs(model_chunks: list, minibatches: list[MiniBatch], spec: LossSpec, key: str,
                      sums: MetricSums | None = None) -> None:
    """Writes ``batch[key]`` ([b, T] log-probs, last pipeline stage) into every microbatch, in place."""
    for mb in minibatches:
        if not mb.microbatches:
            continue
        run_schedule(model_chunks, mb.microbatches, len(mb.microbatches), mb.seq_length,
                     mb.microbatches[0]["tokens"].shape[0],
                     partial(logprob_forward_step, spec=spec, key=key, sums=sums), forward_only=True)


def microbatch_loss(log_prob: torch.Tensor, batch: dict, spec: LossSpec, sums: MetricSums | None = None):
    """One microbatch's share of the mini-batch loss: ``(loss_sum, count, report)`` as megatron's
    per-token-loss schedules take it (the global loss is the sum of loss_sum over the count)."""
    mask = batch["response_mask"]
    loss, metrics = policy_loss(
        log_prob, batch["old_log_prob"], batch["advantages"], mask, mode=spec.mode,
        clip_ratio_low=spec.clip_ratio_low, clip_ratio_high=spec.clip_ratio_high,
        loss_agg_mode=spec.loss_agg_mode,
        # sums, not means: megatron divides by the global count (see the module docstring)
        num_tokens=1.0 if spec.per_token else None, num_seqs=None if spec.per_token else 1.0,
        norm=spec.norm, ref_log_prob=batch.get("ref_log_prob"), kl_coef=spec.kl_coef)
    tokens = mask.sum()
    seqs = (mask.sum(-1) > 0).sum()  # filler rows are empty and do not count
    count = tokens if spec.per_token else seqs
    if sums is not None:
        for name in ("pg_clipfrac", "ratio_mean", "approx_kl_k1", "approx_kl_k3", "kl_loss"):
            if name in metrics:
                sums.add(name, metrics[name], tokens)
        sums.add("seq_ratio_mean", metrics["seq_ratio_mean"], seqs)
    report = torch.stack([loss.detach().float(), count.detach().float()])
    return loss, count.to(torch.int), {"lm_loss": report}


def _gspo_loss(batch: dict, spec: LossSpec, sums: MetricSums, kept: torch.Tensor, output: torch.Tensor):
    return microbatch_loss(_response_log_probs(output, kept, batch, spec), batch, spec, sums)


def gspo_forward_step(data_iterator, model, *, spec: LossSpec, sums: MetricSums):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model)
    return output, partial(_gspo_loss, batch, spec, sums, kept)


@dataclass
class UpdateResult:
    updates: int = 0                    # optimizer steps taken
    skipped: int = 0                    # mini-batches with no sequence to train on (all filtered)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)


def update_policy(model_chunks: list, optimizer, minibatches: list[MiniBatch], spec: LossSpec, ppo_epochs: int,
                  sums: MetricSums) -> UpdateResult:
    """``ppo_epochs`` passes over the mini-batches, one optimizer step each (in the same order every
    epoch: the order is part of what makes the update layout-invariant)."""
    result = UpdateResult()
    for _ in range(ppo_epochs):
        for mb in minibatches:
            if mb.global_sequences == 0:
                result.skipped += 1
                continue
            out = train_step(model_chunks, optimizer, mb.microbatches, len(mb.microbatches), mb.seq_length,
                             mb.microbatches[0]["tokens"].shape[0],
                             forward_step_func=partial(gspo_forward_step, spec=spec, sums=sums))
            result.updates += 1
            result.losses.append(out.loss)
            if out.grad_norm is not None:
                result.grad_norms.append(out.grad_norm)
    return result
