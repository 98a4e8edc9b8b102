"""The policy update through megatron's schedules: log-prob passes and GSPO mini-batch steps.

Loss normalisation. ``train_step`` runs megatron with ``calculate_per_token_loss``: each microbatch's
loss function returns ``(loss_sum, count, report)``, the schedule back-propagates ``loss_sum``
unscaled, and ``finalize_model_grads`` divides every gradient once by the global sum of ``count``
(over microbatches and DP ranks). The GSPO loss is ``(1/S) sum_i loss_i`` over the ``S`` sequences
of a mini-batch (seq-mean-token-mean: ``loss_i`` is sequence ``i``'s token mean), so a microbatch
returns ``sum_i loss_i`` over its sequences (``policy_loss(..., num_seqs=1)``) with ``count`` = its
number of sequences; token-mean returns the token sum with ``count`` = its tokens. The result is the
exact global mean whatever the split into microbatches, DP ranks or pipeline stages, and a sequence's
own mean never crosses a microbatch (a padded row, or a row of a packed microbatch's [S, R] response
view, megagsm.rl.packing, is one whole sequence; context parallelism, which would split them, is
rejected by the trainer).

Nothing is written into the microbatches: each microbatch's loss function returns its log-probs and
metric sums in megatron's per-microbatch report, the schedule hands the reports back (last pipeline
stage), and `compute_log_probs` / `update_policy` return what they gathered; `with_log_probs` makes
the update's microbatches from the rollout ones plus those log-probs.

Old log-probs are recomputed by a forward-only pass over the very microbatches the update then uses
(same shapes, same kernels, same order), so on the first mini-batch of the first epoch the ratio is
exactly 1 and the clip range (3e-4 for GSPO) measures only what the updates moved. The sampler's own
log-probs (KV-cache decoding, other batch shapes) agree only to float rounding; their distance to the
recomputed ones is reported as ``logprob_diff_gen`` (and as the KL ``rollout_kl_k1/k3``).

MoE routing replay (megagsm.rl.routing_replay) enters through a ``RoutingPass`` given to the passes:
it sets each microbatch's routing before the model's forward and reads what the routers chose after
it. The rollout correction (megagsm.rl.rollout_correction) weights the policy-gradient loss by
``pi_old / pi_sampler`` from the microbatch's old and sampler log-probs.
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
from megagsm.models.training import has_moe, run_schedule, train_step
from megagsm.rl.batching import MiniBatch
from megagsm.rl.packing import is_packed, scored_positions
from megagsm.rl.logprobs import token_entropy, token_log_probs
from megagsm.rl.losses import policy_loss
from megagsm.rl.rollout_correction import rollout_weights, sampler_kl
from megagsm.rl.routing_replay import RoutingPass
from megagsm.runtime.collectives import broadcast_from_last_stage, dp_group, reduce_numbers, reduce_tensor

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
    clip_ratio_c: float | None = None   # dual clip for negative advantages (None: off)
    # exactly on-policy (one mini-batch, one epoch): the update's own log-probs, detached, are the old
    # ones, so no forward-only pass runs before it (TRL does the same)
    on_policy: bool = False
    rollout_correction: str = "none"    # none | tis | mis (megagsm.rl.rollout_correction)
    rollout_correction_level: str = "token"
    rollout_correction_threshold: float = 2.0

    @classmethod
    def from_config(cls, gspo: GSPOConfig, generation: GenerationConfig, vocab_limit: int | None) -> LossSpec:
        return cls(mode=gspo.loss_mode, clip_ratio_low=gspo.clip_ratio_low, clip_ratio_high=gspo.clip_ratio_high,
                   loss_agg_mode=gspo.loss_agg_mode, kl_coef=gspo.kl_coef,
                   temperature=generation.temperature if generation.temperature > 0 else 1.0,
                   vocab_limit=vocab_limit, norm=float(generation.max_new_tokens), clip_ratio_c=gspo.clip_ratio_c,
                   # routing replay records and measures routing in the old-log-prob pass, so it keeps it
                   on_policy=gspo.mini_batches == 1 and gspo.ppo_epochs == 1 and gspo.routing_replay == "none",
                   rollout_correction=gspo.rollout_correction,
                   rollout_correction_level=gspo.rollout_correction_level,
                   rollout_correction_threshold=gspo.rollout_correction_threshold)

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


def _model_forward(batch: dict, model, routing: RoutingPass | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last stage: (vocab-parallel logits [n, V/tp] of the n response positions, their rows in the
    sequence-major [s * b] flattening): prompt and padding positions skip the output projection, as
    every loss here is masked by the response mask. Other stages: (hidden states, None). A packed
    microbatch (megagsm.rl.packing) goes in as one THD row with its packed_seq_params."""
    gpt = unwrap_model(model)
    if routing is not None:
        routing.before_forward(batch, model)
    packed = {"packed_seq_params": batch["packed_seq_params"]} if is_packed(batch) else {}
    if not gpt.post_process:
        out = model(batch["tokens"], batch["position_ids"], None, **packed), None
    else:
        hidden = gpt_hidden_states(model, batch["tokens"], batch["position_ids"], None, **packed)
        out = output_layer_rows(model, hidden, scored_positions(batch))
    if routing is not None:
        routing.after_forward(batch, model)
    return out


def _per_position(values: torch.Tensor, kept: torch.Tensor, batch: dict) -> torch.Tensor:
    """[n] values of the response positions -> the microbatch's response view, 0 elsewhere: [b, s]
    for padded rows, [S, R] (sequence, response token) for a packed microbatch."""
    if is_packed(batch):
        index = batch["response_index"]
        if index.numel() != kept.numel():
            raise RuntimeError(f"{kept.numel()} scored positions but {index.numel()} response slots")
        S, R = batch["response_mask"].shape
        return scatter_kept_rows(values, index, S * R).view(S, R)
    b, s = batch["labels"].shape
    return scatter_kept_rows(values, kept, s * b).view(s, b).transpose(0, 1)


def _response_log_probs(output: torch.Tensor, kept: torch.Tensor, batch: dict, spec: LossSpec) -> torch.Tensor:
    if is_packed(batch):  # (a shared prompt's last position predicts each of its responses' first token)
        labels = batch["scored_labels"]
    else:
        labels = batch["labels"].transpose(0, 1).reshape(-1).index_select(0, kept)
    return _per_position(token_log_probs(output, labels, spec.temperature, spec.vocab_limit), kept, batch)


def _old_policy_metrics(output: torch.Tensor, kept: torch.Tensor, log_prob: torch.Tensor, batch: dict,
                        spec: LossSpec) -> dict:
    """Entropy and the sampler-vs-trainer log-prob distance of the policy the rollouts came from."""
    mask = batch["response_mask"]
    tokens = mask.sum()
    entropy = _per_position(token_entropy(output.detach(), spec.temperature, spec.vocab_limit), kept, batch)
    diff = ((log_prob.detach() - batch["gen_log_prob"]).abs() * mask).sum() / tokens.clamp(min=1)
    metrics = {_METRIC + "entropy": metric_entry((entropy * mask).sum() / tokens.clamp(min=1), tokens),
               _METRIC + "logprob_diff_gen": metric_entry(diff, tokens)}
    for name, value in sampler_kl(log_prob.detach(), batch["gen_log_prob"], mask).items():
        metrics[_METRIC + name] = metric_entry(value, tokens)
    return metrics


def _logprob_loss(batch: dict, spec: LossSpec, with_metrics: bool, kept: torch.Tensor, output: torch.Tensor):
    log_prob = _response_log_probs(output, kept, batch, spec).detach()
    report = {"log_prob": log_prob}
    if with_metrics:
        report.update(_old_policy_metrics(output, kept, log_prob, batch, spec))
    return torch.zeros((), device=output.device), batch["response_mask"].sum().to(torch.int), report


def logprob_forward_step(data_iterator, model, *, spec: LossSpec, with_metrics: bool,
                         routing: RoutingPass | None = None):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model, routing)
    return output, partial(_logprob_loss, batch, spec, with_metrics, kept)


@dataclass
class LogProbs:
    """A forward-only pass's result: per mini-batch, per microbatch, [b, T] log-probs (empty lists
    on pipeline stages other than the last), and its metric sums."""

    values: list[list[torch.Tensor]]
    metrics: MetricSums
    routing: list[list[torch.Tensor]] = field(default_factory=list)  # per microbatch, what the routers chose
    routing_counts: torch.Tensor | None = None                         # RoutingPass.sums of the pass


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
                      with_metrics: bool = False, routing: RoutingPass | None = None) -> LogProbs:
    """Log-probs of every response token under the current weights, microbatch by microbatch, with
    the model in eval mode (deterministic: no dropout); `routing` routes the pass (and keeps or
    counts what the routers chose)."""
    with _eval_mode(model_chunks):
        return _forward_only_log_probs(model_chunks, minibatches, spec, with_metrics, routing)


def _forward_only_log_probs(model_chunks, minibatches, spec, with_metrics, routing) -> LogProbs:
    values, reports, chosen = [], [], []
    for mb in minibatches:
        if not mb.microbatches:
            values.append([])
            chosen.append([])
            continue
        first = len(routing.kept) if routing is not None else 0
        try:
            out = run_schedule(model_chunks, mb.microbatches, len(mb.microbatches), mb.seq_length,
                               mb.micro_batch_size, partial(logprob_forward_step, spec=spec,
                                                            with_metrics=with_metrics, routing=routing),
                               forward_only=True)
        finally:
            if routing is not None:
                routing.finish()
        values.append([report["log_prob"] for report in out])
        chosen.append(routing.kept[first:] if routing is not None else [])
        reports += out
    return LogProbs(values, MetricSums.from_reports(reports), chosen,
                    routing.sums if routing is not None else None)


def with_log_probs(minibatches: list[MiniBatch], log_probs: LogProbs, key: str) -> list[MiniBatch]:
    """New mini-batches whose microbatches also hold `key` ([b, T], where this stage computed it)."""
    return with_values(minibatches, log_probs.values, key)


def with_values(minibatches: list[MiniBatch], per_microbatch: list[list], key: str) -> list[MiniBatch]:
    """New mini-batches whose microbatches also hold `key` (where this stage has a value)."""
    out = []
    for mb, values in zip(minibatches, per_microbatch):
        micro = [dict(batch, **{key: values[i]}) if i < len(values) else batch
                 for i, batch in enumerate(mb.microbatches)]
        out.append(replace(mb, microbatches=micro))
    return out


def microbatch_loss(log_prob: torch.Tensor, batch: dict, spec: LossSpec):
    """One microbatch's share of the mini-batch loss: ``(loss_sum, count, report)`` as megatron's
    per-token-loss schedules take it (the global loss is the sum of loss_sum over the count); the
    report also carries the microbatch's metric entries."""
    mask = batch["response_mask"]
    weights = None
    if spec.rollout_correction != "none":
        weights, correction = rollout_weights(batch["old_log_prob"], batch["gen_log_prob"], mask,
                                              spec.rollout_correction, spec.rollout_correction_level,
                                              spec.rollout_correction_threshold)
    loss, metrics = policy_loss(
        log_prob, batch["old_log_prob"], batch["advantages"], mask, mode=spec.mode,
        clip_ratio_low=spec.clip_ratio_low, clip_ratio_high=spec.clip_ratio_high,
        loss_agg_mode=spec.loss_agg_mode,
        # sums, not means: megatron divides by the global count (see the module docstring)
        num_tokens=1.0 if spec.per_token else None, num_seqs=None if spec.per_token else 1.0,
        norm=spec.norm, ref_log_prob=batch.get("ref_log_prob"), kl_coef=spec.kl_coef, clip_ratio_c=spec.clip_ratio_c,
        token_weights=weights)
    tokens = mask.sum()
    seqs = (mask.sum(-1) > 0).sum()  # filler rows are empty and do not count
    count = tokens if spec.per_token else seqs
    report = {"lm_loss": torch.stack([loss.detach().float(), count.detach().float()])}
    for name in ("pg_clipfrac", "pg_clipfrac_lower", "ratio_mean", "approx_kl_k1", "approx_kl_k3", "kl_loss"):
        if name in metrics:
            report[_METRIC + name] = metric_entry(metrics[name], tokens)
    report[_METRIC + "seq_ratio_mean"] = metric_entry(metrics["seq_ratio_mean"], seqs)
    if weights is not None:
        for name, value in correction.items():
            report[_METRIC + name] = metric_entry(value, tokens)
    return loss, count.to(torch.int), report


def _gspo_loss(batch: dict, spec: LossSpec, kept: torch.Tensor, output: torch.Tensor):
    log_prob = _response_log_probs(output, kept, batch, spec)
    if not spec.on_policy:
        return microbatch_loss(log_prob, batch, spec)
    loss, count, report = microbatch_loss(log_prob, dict(batch, old_log_prob=log_prob.detach()), spec)
    report.update(_old_policy_metrics(output, kept, log_prob, batch, spec))
    return loss, count, report


def gspo_forward_step(data_iterator, model, *, spec: LossSpec, routing: RoutingPass | None = None):
    batch = next(data_iterator)
    output, kept = _model_forward(batch, model, routing)
    return output, partial(_gspo_loss, batch, spec, kept)


def _global_count(model_chunks: list, mb: MiniBatch, spec: LossSpec) -> float | None:
    """What megatron divides the mini-batch's gradients by (MoE aux losses need it; None otherwise)."""
    if not has_moe(model_chunks):
        return None
    if not spec.per_token:
        return float(mb.global_sequences)
    local = sum(float(batch["response_mask"].sum()) for batch in mb.microbatches)
    return reduce_numbers([local], "sum", dp_group())[0]


@dataclass
class UpdateResult:
    updates: int = 0                    # optimizer steps taken
    skipped: int = 0                    # mini-batches with no sequence to train on (all filtered)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    metrics: MetricSums = field(default_factory=MetricSums)


def update_policy(model_chunks: list, optimizer, minibatches: list[MiniBatch], spec: LossSpec,
                  ppo_epochs: int, routing: RoutingPass | None = None) -> UpdateResult:
    """``ppo_epochs`` passes over the mini-batches, one optimizer step each (in the same order every
    epoch: the order is part of what makes the update layout-invariant). The microbatches must hold
    old_log_prob (and ref_log_prob with kl_coef > 0): see with_log_probs. `routing` replays a
    microbatch key's routing in every forward and recompute."""
    result = UpdateResult()
    reports = []
    for _ in range(ppo_epochs):
        for mb in minibatches:
            if mb.global_sequences == 0:
                result.skipped += 1
                continue
            try:
                out = train_step(model_chunks, optimizer, mb.microbatches, len(mb.microbatches), mb.seq_length,
                                 mb.micro_batch_size, forward_step_func=partial(gspo_forward_step, spec=spec,
                                                                                routing=routing),
                                 global_count=_global_count(model_chunks, mb, spec))
            finally:
                if routing is not None:
                    routing.finish()
            reports += out.reports
            result.updates += 1
            result.losses.append(out.loss)
            if out.grad_norm is not None:
                result.grad_norms.append(out.grad_norm)
    result.metrics = MetricSums.from_reports(reports)
    return result
