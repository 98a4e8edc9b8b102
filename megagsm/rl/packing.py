"""Rollouts -> packed, token-budgeted microbatches (``train.max_tokens_per_microbatch`` > 0 or auto).

Padded rows (megagsm.rl.batching) spend most of their compute on padding when response lengths have
a long tail. Here a microbatch is one row of ``T`` tokens holding whole sequences back to back
(``tokens = seq[:-1]``, ``labels = seq[1:]`` each, as in batching), the model input in THD form
(megagsm.models.packed_seq: per-document causal attention, RoPE positions restarting per sequence),
the unused tail one padding document that no loss reads.

- Budget: as many microbatches as first-fit decreasing needs for bins of at most ``budget`` tokens
  on the DP rank with the most (megagsm.data.packing.first_fit_bins), the sequences then spread over
  that many bins of about equal fill (``even_bins``). ``T`` is the fullest bin of the mini-batch over
  all DP ranks, rounded up to the sequence-length multiple: every microbatch of a mini-batch has one shape
  (pipeline stages exchange activations of one shape; sequence parallelism splits T over TP ranks).
- DP balance: the mini-batch's sequences are re-placed over DP ranks by token count
  (megagsm.rl.balance) after the advantages are computed; every rank runs as many microbatches as
  the rank with the most bins (a rank with fewer sequences than that adds filler microbatches: one
  padding document, nothing scored), and every rank computes that plan itself from the all-gathered
  lengths.
- Loss view: the loss functions (megagsm.rl.losses) keep working on a per-sequence ``[S, R]`` view
  (S sequences of the microbatch, R its longest response): ``response_mask``, ``advantages`` and
  ``gen_log_prob`` are ``[S, R]``, and ``response_index`` maps the scored packed positions
  (``scored``, in packed order: the rows `output_layer_rows` keeps) to flat ``[S * R]`` slots. A
  sequence's ratio, mean and count are those of its own row of the view, whatever microbatch it
  lands in, so the loss normalisation is the padded path's.
- Routing replay: a sequence's ``[L + R - 1, layers, k]`` rollout routing is packed like its tokens
  (``routing`` ``[1, T, layers, k]``, padding tail experts 0..k-1); ``token_mask`` marks the real
  tokens for the routing-match counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megagsm.data.packing import first_fit_bins
from megagsm.models.packed_seq import document_positions, thd_params
from megagsm.rl.balance import assign_by_tokens, exchange, gather_lengths
from megagsm.rl.batching import LABEL_PAD, Advantages, MiniBatch, Rollouts
from megagsm.rl.routing_replay import filler_routing
from megagsm.runtime.collectives import dp_group as data_parallel_group
from megagsm.runtime.collectives import group_rank


def is_packed(batch: dict) -> bool:
    return "packed_seq_params" in batch


def scored_positions(batch: dict) -> torch.Tensor:
    """[b, T] bool: the positions whose logits a loss reads (response positions)."""
    return batch["scored"] if is_packed(batch) else batch["response_mask"] > 0


def token_budget(max_tokens: int | None, micro_batch_size: int, max_prompt_len: int, max_new_tokens: int,
                 multiple: int) -> int:
    """Tokens per packed microbatch; 0 keeps padded rows. Auto (None): what micro_batch_size padded
    rows of the longest sequences would hold, rounded up to the sequence-length multiple."""
    if max_tokens is not None:
        return max_tokens
    return math.ceil(micro_batch_size * (max_prompt_len + max_new_tokens) / multiple) * multiple


@dataclass
class Sample:
    """One sequence with everything its loss needs; moves between DP ranks (tensors on the CPU)."""

    prompt: list[int]
    response: list[int]
    advantage: float
    gen_log_prob: torch.Tensor | None = None  # [R]
    routing: torch.Tensor | None = None       # [L + R - 1, layers, k]

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.response) - 1


def pack_microbatch(samples: list[Sample], T: int, routing_like: torch.Tensor | None = None,
                    device: torch.device | None = None) -> dict:
    """One packed THD microbatch of ``T`` tokens (see the module docstring); no samples: a filler."""
    lengths = [s.tokens for s in samples]
    used = sum(lengths)
    if used > T:
        raise ValueError(f"{used} tokens do not fit a microbatch of {T}")
    S, R = max(len(samples), 1), max((len(s.response) for s in samples), default=1)
    tokens = torch.full((T,), LABEL_PAD, dtype=torch.long)
    labels = torch.full((T,), LABEL_PAD, dtype=torch.long)
    scored = torch.zeros(T, dtype=torch.bool)
    mask, advantages, gen = torch.zeros(S, R), torch.zeros(S, R), torch.zeros(S, R)
    index = []
    start = 0
    for i, s in enumerate(samples):
        seq = torch.tensor(list(s.prompt) + list(s.response))
        n, L, r = len(seq) - 1, len(s.prompt), len(s.response)
        tokens[start:start + n], labels[start:start + n] = seq[:-1], seq[1:]
        scored[start + L - 1: start + L - 1 + r] = True
        index.append(torch.arange(r) + i * R)
        mask[i, :r] = 1.0
        advantages[i, :r] = s.advantage
        if s.gen_log_prob is not None:
            gen[i, :r] = s.gen_log_prob[:r].float()
        start += n
    documents = lengths + ([T - used] if used < T else [])
    batch = {"tokens": tokens, "labels": labels, "position_ids": document_positions(documents), "scored": scored,
             "response_index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
             "response_mask": mask, "advantages": advantages, "gen_log_prob": gen}
    batch = {key: (value.unsqueeze(0) if value.shape == (T,) else value) for key, value in batch.items()}
    if routing_like is not None:
        parts = [s.routing for s in samples]
        for s, part in zip(samples, parts):
            if part is None or part.shape[0] != s.tokens:
                raise ValueError(f"routing covers {None if part is None else part.shape[0]} tokens, "
                                 f"the sequence feeds {s.tokens}")
        tail = filler_routing(T - used, *routing_like.shape[1:], routing_like.dtype)
        batch["routing"] = torch.cat([*[p.to(routing_like.dtype) for p in parts], tail]).unsqueeze(0)
        batch["token_mask"] = (torch.arange(T) < used).unsqueeze(0)
    if device is not None:
        batch = {key: value.to(device) for key, value in batch.items()}
    batch["packed_seq_params"] = thd_params(documents, device)
    return batch


def even_bins(lengths: list[int], count: int, budget: int) -> list[list[int]]:
    """Indices into ``count`` bins of about equal fill, each within ``budget``: the microbatch length T is
    the fullest bin, so a mini-batch's unused tail is spread over its microbatches instead of sitting in
    one nearly empty last bin. Longest first, each to the emptiest bin (LPT); should that overflow the
    budget (possible, as LPT is not an exact partition), first-fit decreasing's bins, which fit."""
    bins: list[list[int]] = [[] for _ in range(count)]
    fill = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = min(range(count), key=lambda j: (fill[j], j))
        bins[b].append(i)
        fill[b] += lengths[i]
    if max(fill, default=0) <= budget:
        return bins
    fitted = first_fit_bins(lengths, budget, "decreasing")
    return fitted + [[] for _ in range(count - len(fitted))]


def _samples(rollouts: Rollouts, advantages: Advantages, mini_batches: int) -> list[list[Sample]]:
    """This rank's trained sequences per mini-batch (filtered groups dropped)."""
    out: list[list[Sample]] = [[] for _ in range(mini_batches)]
    for i, k in enumerate(rollouts.mini_batch):
        if not bool(advantages.keep[i]):
            continue
        gen = None if rollouts.gen_log_probs is None else rollouts.gen_log_probs[i].detach().cpu()
        routing = None if rollouts.routing is None else rollouts.routing[i].cpu()
        out[k].append(Sample(rollouts.prompts[i], rollouts.responses[i], float(advantages.values[i]), gen, routing))
    return out


def build_packed_minibatches(rollouts: Rollouts, advantages: Advantages, mini_batches: int, budget: int,
                             multiple: int = 8, dp_group=None, device: torch.device | None = None) -> list[MiniBatch]:
    """The update's input: one MiniBatch of packed microbatches per mini-batch index, its sequences
    balanced over DP ranks by tokens, microbatch counts and shapes the same on every DP rank."""
    if budget < 1:
        raise ValueError(f"a packed microbatch needs a positive token budget, got {budget}")
    if dp_group is None:
        dp_group = data_parallel_group()
    local = _samples(rollouts, advantages, mini_batches)
    lengths_local = [[s.tokens for s in mb] for mb in local]
    if dp_group is not None:
        lengths = gather_lengths(lengths_local, dp_group)     # [mini-batch][rank][i]
        placements = [assign_by_tokens(per_rank) for per_rank in lengths]
        mine = exchange(local, placements, dp_group)
        me = group_rank(dp_group)
    else:
        lengths = [[row] for row in lengths_local]
        placements = [[[(0, i) for i in range(len(row))]] for row in lengths_local]
        mine, me = local, 0
    routing_like = rollouts.routing[0] if rollouts.routing else None
    out = []
    for k, plan in enumerate(placements):
        sizes = [[lengths[k][home][i] for home, i in items] for items in plan]
        count = max(len(first_fit_bins(row, budget, "decreasing")) for row in sizes)
        rank_bins = [even_bins(row, count, budget) for row in sizes]
        fills = [sum(row[j] for j in b) for row, bins in zip(sizes, rank_bins) for b in bins]
        T = max([multiple] + [math.ceil(fill / multiple) * multiple for fill in fills])
        bins = [sorted(b) for b in rank_bins[me]] + [[] for _ in range(count - len(rank_bins[me]))]
        micro = [pack_microbatch([mine[k][j] for j in b], T, routing_like, device) for b in bins]
        real = sum(s.tokens for s in mine[k])
        out.append(MiniBatch(micro, T, len(mine[k]), sum(map(len, lengths[k])),
                             computed_tokens=T * len(micro), real_tokens=real))
    return out

