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

Nothing is written into the microbatches: each microbatch's loss function returns its log-probs and
metric sums in megatron's per-microbatch report, the schedule hands the reports back (last pipeline
stage), and `compute_log_probs` / `update_policy` return what they gathered; `with_log_probs` makes
the update's microbatches from the rollout ones plus those log-probs.

Old log-probs are recomputed by a forward-only pass over the very microbatches the update then uses
(same shapes, same kernels, same order), so on the first mini-batch of the first epoch the ratio is
exactly 1 and the clip range (3e-4 for GSPO) measures only what the updates moved. The sampler's own
log-probs (KV-cache decoding, other batch shapes) agree only to float rounding; their distance to the
recomputed ones is reported as ``logprob_diff_gen``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from megagsm.config.algorithm import GSPOConfig
from megagsm.config.generation import GenerationConfig
from megagsm.models.gpt import unwrap_model
from megagsm.models.output_rows import gpt_hidden_states, output_layer_rows, scatter_kept_rows
from megagsm.models.training import run_schedule, train_step
from megagsm.rl.batching import MiniBatch
from megagsm.rl.logprobs import token_entropy, token_log_probs
from megagsm.rl.losses import policy_loss
from megagsm.runtime.collectives import broadcast_from_last_stage, dp_group, reduce_tensor

_METRIC = "metric/"   # report keys holding [value * weight, weight] of one metric


@dataclass(frozen=True)
class LossSpec:
    mode: str = "gspo"
    clip_ratio_low: float = 3e-4
    clip_ratio_high: float = 4e-4
    loss_agg_mode: str = "seq-mean-token-mean"
    kl_coef: float = 0.0
    temperature: float = 1.0            # the sampler's: log-probs are those of the tempered policy
    vocab_limit: int | None = None
    norm: float | None = None           # seq-mean-token-sum-norm's constant (max response length)

    @classmethod
    def from_config(cls, gspo: GSPOConfig, generation: GenerationConfig, vocab_limit: int | None) -> LossSpec:
        return cls(mode=gspo.loss_mode, clip_ratio_low=gspo.clip_ratio_low, clip_ratio_high=gspo.clip_ratio_high,
                   loss_agg_mode=gspo.loss_agg_mode, kl_coef=gspo.kl_coef,
                   temperature=generation.temperature if generation.temperature > 0 else 1.0,
                   vocab_limit=vocab_limit, norm=float(generation.max_new_tokens))

    @property
    def per_token(self) -> bool:
        return self.loss_agg_mode == "token-mean"


def metric_entry(value, weight) -> torch.Tensor:
    """One microbatch's share of a weighted-mean metric, as a report entry."""
    weight = torch.as_tensor(weight).detach().double()
    return torch.stack([torch.as_tensor(value).detach().double() * weight, weight])


class MetricSums:
    """Weighted sums of per-microbatch metrics: {name: [sum of value * weight, sum of weight]}, kept as
    tensors so that accumulating them costs no device synchronisation."""

    def __init__(self):
        self.sums: dict[str, list] = {}

    def add(self, name: str, value, weight) -> None:
        entry = metric_entry(value, weight)
        total = self.sums.setdefault(name, [0.0, 0.0])
        total[0] = total[0] + entry[0]
        total[1] = total[1] + entry[1]

    @classmethod
    def from_reports(cls, reports: list[dict]) -> MetricSums:
        """The metric entries of megatron's per-microbatch reports, summed in microbatch order."""
        sums = cls()
        for report in reports:
            for key, entry in report.items():
                if key.startswith(_METRIC):
                    total = sums.sums.setdefault(key[len(_METRIC):], [0.0, 0.0])
                    total[0] = total[0] + entry[0]
                    total[1] = total[1] + entry[1]
        return sums

    def merged(self, other: MetricSums) -> MetricSums:
        out = MetricSums()
        for source in (self, other):
            for name, (value, weight) in source.sums.items():
                total = out.sums.setdefault(name, [0.0, 0.0])
                total[0], total[1] = total[0] + value, total[1] + weight
        return out

    def reduce(self, names: list[str]) -> dict[str, float]:
        """Means over DP ranks, taken on the last pipeline stage and shared with every rank. ``names``
        must be the same list on every rank (absent ones count as empty)."""
        t = torch.tensor([[float(x) for x in self.sums.get(n, [0.0, 0.0])] for n in names],
                         dtype=torch.float64).view(-1)
        t = broadcast_from_last_stage(reduce_tensor(t, "sum", dp_group())).view(-1, 2)
        return {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(names) if t[i, 1] > 0}


def _model_forward(batch: dict, model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last stage: (vocab-parallel logits [n, V/tp] of the n response positions, their rows in the
    sequence-major [s * b] flattening): prompt and padding positions skip the output projection, as
    every loss here is masked by response_mask. Other stages: (hidden states, None)."""
    gpt = unwrap_model(model)
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


def _logprob_loss(batch: dict, spec: LossSpec, with_metrics: bool, kept: torch.Tensor, output: torch.Tensor):
    log_prob = _response_log_probs(output, kept, batch, spec).detach()
    mask = batch["response_mask"]
    tokens = mask.sum()
    report = {"log_prob": log_prob}
    if with_metrics:
        entropy = _per_position(token_entropy(output, spec.temperature, spec.vocab_limit), kept, batch)
        report[_METRIC + "entropy"] = metric_entry((entropy * mask).sum() / tokens.clamp(min=1), tokens)
        diff = ((log_prob - batch["gen_log_prob"]).abs() * mask).sum() / tokens.clamp(min=1)
        report[_METRIC + "logprob_diff_gen"] = metric_entry(diff, tokens)
    return torch.zeros((), device=output.device), tokens.to(torch.int), report


def logprob_forward_step(data_iterator, model, *, spec: LossSpec, with_metrics: bool):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model)
    return output, partial(_logprob_loss, batch, spec, with_metrics, kept)


@dataclass
class LogProbs:
    """A forward-only pass's result: per mini-batch, per microbatch, [b, T] log-probs (empty lists
    on pipeline stages other than the last), and its metric sums."""

    values: list[list[torch.Tensor]]
    metrics: MetricSums


@contextlib.contextmanager
def _eval_mode(model_chunks: list):
    """eval() for the duration, then every module's own train/eval flag back. megatron's forward-only
    schedule leaves the model in train mode, where dropout (LoRA's included) would make log-probs a
    random draw; with every dropout at 0 (megagsm's default) the numbers are the same either way."""
    modules = [m for chunk in model_chunks for m in chunk.modules()]
    was_training = [m.training for m in modules]
    for chunk in model_chunks:
        chunk.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was_training):
            m.training = training


@torch.no_grad()
def compute_log_probs(model_chunks: list, minibatches: list[MiniBatch], spec: LossSpec,
                      with_metrics: bool = False) -> LogProbs:
    """Log-probs of every response token under the current weights, microbatch by microbatch, with
    the model in eval mode (deterministic: no dropout)."""
    with _eval_mode(model_chunks):
        return _forward_only_log_probs(model_chunks, minibatches, spec, with_metrics)


def _forward_only_log_probs(model_chunks, minibatches, spec, with_metrics) -> LogProbs:
    values, reports = [], []
    for mb in minibatches:
        if not mb.microbatches:
            values.append([])
            continue
        out = run_schedule(model_chunks, mb.microbatches, len(mb.microbatches), mb.seq_length, mb.micro_batch_size,
                           partial(logprob_forward_step, spec=spec, with_metrics=with_metrics), forward_only=True)
        values.append([report["log_prob"] for report in out])
        reports += out
    return LogProbs(values, MetricSums.from_reports(reports))


def with_log_probs(minibatches: list[MiniBatch], log_probs: LogProbs, key: str) -> list[MiniBatch]:
    """New mini-batches whose microbatches also hold `key` ([b, T], where this stage computed it)."""
    out = []
    for mb, values in zip(minibatches, log_probs.values):
        micro = [dict(batch, **{key: values[i]}) if i < len(values) else batch
                 for i, batch in enumerate(mb.microbatches)]
        out.append(replace(mb, microbatches=micro))
    return out


def microbatch_loss(log_prob: torch.Tensor, batch: dict, spec: LossSpec):
    """One microbatch's share of the mini-batch loss: ``(loss_sum, count, report)`` as megatron's
    per-token-loss schedules take it (the global loss is the sum of loss_sum over the count); the
    report also carries the microbatch's metric entries."""
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
    report = {"lm_loss": torch.stack([loss.detach().float(), count.detach().float()])}
    for name in ("pg_clipfrac", "ratio_mean", "approx_kl_k1", "approx_kl_k3", "kl_loss"):
        if name in metrics:
            report[_METRIC + name] = metric_entry(metrics[name], tokens)
    report[_METRIC + "seq_ratio_mean"] = metric_entry(metrics["seq_ratio_mean"], seqs)
    return loss, count.to(torch.int), report


def _gspo_loss(batch: dict, spec: LossSpec, kept: torch.Tensor, output: torch.Tensor):
    return microbatch_loss(_response_log_probs(output, kept, batch, spec), batch, spec)


def gspo_forward_step(data_iterator, model, *, spec: LossSpec):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model)
    return output, partial(_gspo_loss, batch, spec, kept)


@dataclass
class UpdateResult:
    updates: int = 0                    # optimizer steps taken
    skipped: int = 0                    # mini-batches with no sequence to train on (all filtered)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    metrics: MetricSums = field(default_factory=MetricSums)


def update_policy(model_chunks: list, optimizer, minibatches: list[MiniBatch], spec: LossSpec,
                  ppo_epochs: int) -> UpdateResult:
    """``ppo_epochs`` passes over the mini-batches, one optimizer step each (in the same order every
    epoch: the order is part of what makes the update layout-invariant). The microbatches must hold
    old_log_prob (and ref_log_prob with kl_coef > 0): see with_log_probs."""
    result = UpdateResult()
    reports = []
    for _ in range(ppo_epochs):
        for mb in minibatches:
            if mb.global_sequences == 0:
                result.skipped += 1
                continue
            out = train_step(model_chunks, optimizer, mb.microbatches, len(mb.microbatches), mb.seq_length,
                             mb.micro_batch_size, forward_step_func=partial(gspo_forward_step, spec=spec))
            reports += out.reports
            result.updates += 1
            result.losses.append(out.loss)
            if out.grad_norm is not None:
                result.grad_norms.append(out.grad_norm)
    result.metrics = MetricSums.from_reports(reports)
    return result
