"""Rollouts -> padded training microbatches: ``[b, T]`` tensors with response masks and per-token
advantages (``train.max_tokens_per_microbatch=0``; GSPO packs by default: megagsm.rl.packing).

A sequence is its prompt followed by its response. The model sees ``tokens = seq[:-1]`` and predicts
``labels = seq[1:]``: position ``t`` holds ``log pi(seq[t+1] | seq[:t+1])``, so response token ``j``
(at ``seq[L + j]`` for a prompt of length ``L``) is scored at position ``L - 1 + j``, and the response
mask is 1 on positions ``[L-1, L-1+R)``. Rows are right-padded: with causal attention the padding
after a sequence cannot affect it, so no attention mask is needed and positions are ``0..len-1``.

Each mini-batch's share on this rank is cut into microbatches of exactly ``micro_batch_size`` rows,
all padded to one length (pipeline stages exchange activations of one shape per call); missing rows
are filler rows with an empty mask, which add nothing to the loss or to the sequence counts. Every
DP rank runs the same number of microbatches per mini-batch (expert parallelism exchanges tokens
inside every forward, so ranks must step together); the counts are agreed with one all-reduce.

With MoE routing recorded at rollout time (``Rollouts.routing``), microbatches also hold ``routing``
``[b, T, layers, k]``: a row's position t carries the rollout's expert choice for token t (see
megagsm.generation.routing for why the orders agree), padding positions experts 0..k-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megagsm.rl.losses import group_advantages
from megagsm.rl.routing_replay import filler_routing
from megagsm.runtime.collectives import dp_group as data_parallel_group
from megagsm.runtime.collectives import group_size, reduce_tensor

LABEL_PAD = 0  # a valid id under any vocab limit: padded positions are masked, never -inf


@dataclass
class Rollouts:
    """This rank's sequences, ``group_size`` consecutive ones per prompt."""

    prompts: list[list[int]]            # per sequence
    responses: list[list[int]]          # per sequence (EOS included when the model stopped)
    rewards: torch.Tensor               # [N] fp32
    mini_batch: list[int]               # per sequence: the mini-batch it is trained in
    group_size: int
    gen_log_probs: list[torch.Tensor] | None = None  # per sequence, the sampler's log-probs [R]
    routing: list[torch.Tensor] | None = None  # per sequence, the rollout's [L + R - 1, layers, k] expert ids

    def __post_init__(self):
        n = len(self.prompts)
        if not (len(self.responses) == len(self.mini_batch) == self.rewards.numel() == n):
            raise ValueError("prompts, responses, rewards and mini_batch must have one entry per sequence")
        if n % self.group_size:
            raise ValueError(f"{n} sequences are not whole groups of {self.group_size}")
        if any(len(r) == 0 for r in self.responses):
            raise ValueError("every response needs at least one token")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Advantages:
    values: torch.Tensor                # [N] per-sequence advantage
    keep: torch.Tensor                  # [N] bool: trained on (False: a filtered zero-std group)
    stats: dict = field(default_factory=dict)


def compute_advantages(rollouts: Rollouts, eps: float = 1e-6, std_normalize: bool = True,
                       filter_zero_std_groups: bool = False) -> Advantages:
    values, stats = group_advantages(rollouts.rewards, rollouts.group_size, eps, std_normalize)
    grouped = rollouts.rewards.view(-1, rollouts.group_size)
    zero_std = (grouped.amax(-1) == grouped.amin(-1)).repeat_interleave(rollouts.group_size)
    keep = ~zero_std if filter_zero_std_groups else torch.ones_like(zero_std)
    return Advantages(values, keep, stats)


@dataclass
class MiniBatch:
    microbatches: list[dict]            # this rank's, each exactly micro_batch_size rows (packed: one)
    seq_length: int
    local_sequences: int                # real sequences here
    global_sequences: int = 0           # over all DP ranks (0: nothing to train on: skip the update)
    computed_tokens: int = 0            # token positions the model runs over here, padding included
    real_tokens: int = 0                # of which sequence tokens

    @property
    def micro_batch_size(self) -> int:
        return self.microbatches[0]["tokens"].shape[0] if self.microbatches else 0


def _row(prompt: list[int], response: list[int], advantage: float, gen_lp: torch.Tensor | None, T: int,
         routing: torch.Tensor | None = None) -> dict:
    seq = list(prompt) + list(response)
    n, L, R = len(seq) - 1, len(prompt), len(response)
    tokens = torch.full((T,), LABEL_PAD, dtype=torch.long)
    labels = torch.full((T,), LABEL_PAD, dtype=torch.long)
    tokens[:n] = torch.tensor(seq[:-1])
    labels[:n] = torch.tensor(seq[1:])
    mask = torch.zeros(T)
    mask[L - 1: L - 1 + R] = 1.0
    gen = torch.zeros(T)
    if gen_lp is not None:
        gen[L - 1: L - 1 + R] = gen_lp[:R].float()
    row = {"tokens": tokens, "labels": labels, "response_mask": mask, "advantages": mask * advantage,
           "gen_log_prob": gen}
    if routing is not None:
        if routing.shape[0] != n:
            raise ValueError(f"routing covers {routing.shape[0]} tokens, the sequence feeds {n}")
        row["routing"] = torch.cat([routing, filler_routing(T - n, *routing.shape[1:], routing.dtype)])
    return row


def _filler_row(T: int, routing_like: torch.Tensor | None = None) -> dict:
    z = torch.zeros(T)
    row = {"tokens": torch.full((T,), LABEL_PAD, dtype=torch.long),
           "labels": torch.full((T,), LABEL_PAD, dtype=torch.long),
           "response_mask": z, "advantages": z.clone(), "gen_log_prob": z.clone()}
    if routing_like is not None:
        row["routing"] = filler_routing(T, *routing_like.shape[1:], routing_like.dtype)
    return row


def padded_length(lengths: list[int], multiple: int) -> int:
    return max(multiple, math.ceil(max(lengths, default=1) / multiple) * multiple)


def build_minibatches(rollouts: Rollouts, advantages: Advantages, mini_batches: int, micro_batch_size: int,
                      multiple: int = 8, dp_group=None, device: torch.device | None = None) -> list[MiniBatch]:
    """The update's input: one MiniBatch per mini-batch index, microbatch counts agreed over DP."""
    rows_per_mb: list[list[int]] = [[] for _ in range(mini_batches)]
    for i, k in enumerate(rollouts.mini_batch):
        if bool(advantages.keep[i]):
            rows_per_mb[k].append(i)
    counts = torch.tensor([[math.ceil(len(r) / micro_batch_size) for r in rows_per_mb],
                           [len(r) for r in rows_per_mb]], dtype=torch.long)
    if dp_group is None:
        dp_group = data_parallel_group()
    local = counts[1].clone()
    if dp_group is not None and group_size(dp_group) > 1:
        # max microbatches (so every rank steps together) and total sequences per mini-batch
        counts = torch.stack([reduce_tensor(counts[0], "max", dp_group), reduce_tensor(counts[1], "sum", dp_group)])
    out = []
    for k, rows in enumerate(rows_per_mb):
        lengths = [len(rollouts.prompts[i]) + len(rollouts.responses[i]) - 1 for i in rows]
        T = padded_length(lengths, multiple)
        routing = rollouts.routing
        built = [_row(rollouts.prompts[i], rollouts.responses[i], float(advantages.values[i]),
                      None if rollouts.gen_log_probs is None else rollouts.gen_log_probs[i], T,
                      None if routing is None else routing[i]) for i in rows]
        built += [_filler_row(T, None if routing is None else routing[0])
                  for _ in range(int(counts[0, k]) * micro_batch_size - len(built))]
        micro = []
        for start in range(0, len(built), micro_batch_size):
            part = built[start: start + micro_batch_size]
            batch = {key: torch.stack([r[key] for r in part]) for key in part[0]}
            batch["position_ids"] = torch.arange(T).expand(len(part), T).contiguous()
            if device is not None:
                batch = {key: value.to(device) for key, value in batch.items()}
            micro.append(batch)
        out.append(MiniBatch(micro, T, int(local[k]), int(counts[1, k]), computed_tokens=T * len(built),
                             real_tokens=sum(lengths)))
    return out
