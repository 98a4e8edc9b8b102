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
  (``scored``, each response token's predecessor: the rows `output_layer_rows` keeps) to flat
  ``[S * R]`` slots. A sequence's ratio, mean and count are those of its own row of the view,
  whatever microbatch it lands in, so the loss normalisation is the padded path's.
- Shared prompts (``share_prompts``, train.share_prompts): the ``n`` sequences of a prompt group travel
  (DP balance) and pack as one unit, the prompt laid out once: a document of the prompt's ``L`` tokens,
  then per response a document of ``response[:-1]`` continuing it (thd_params' ``prefix_of``: RoPE
  positions from ``L`` on, attention over the prompt's tokens as if they preceded it). The prompt's
  last position predicts every response's first token, so ``scored`` lists it once per response and
  ``scored_labels`` holds each scored position's label. A group cut by the budget packs as several
  units, each with its own copy of the prompt. The model's token-wise work (every GEMM, norm and MLP)
  on a prompt runs once instead of ``n`` times; the loss view is unchanged.
- Routing replay: a sequence's ``[L + R - 1, layers, k]`` rollout routing is packed like its tokens
  (``routing`` ``[1, T, layers, k]``, padding tail experts 0..k-1); ``token_mask`` marks the real
  tokens for the routing-match counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    """The positions whose logits a loss reads: [b, T] bool for padded rows (response positions); for
    a packed row the [n] predecessor of every response token in response-view order (a shared
    prompt's last position once per sequence continuing it), with its label in ``scored_labels``."""
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
    group: tuple | None = None                # (home rank, prompt group): who shares this prompt

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.response) - 1


def shared_tokens(unit: list[Sample]) -> int:
    """Tokens a run of one group's sequences feeds with its prompt laid out once (pack_microbatch)."""
    if len(unit) == 1:
        return unit[0].tokens
    return len(unit[0].prompt) + sum(len(s.response) - 1 for s in unit)


def prompt_units(samples: list[Sample], budget: int, share: bool) -> list[list[Sample]]:
    """What packing places: one sequence each, or (share) runs of a group's sequences that share
    their prompt, each within the budget (a group too big for one is cut into several runs)."""
    if not share:
        return [[s] for s in samples]
    units: list[list[Sample]] = []
    for s in samples:
        last = units[-1] if units else None
        same = (last is not None and s.group is not None and last[0].group is not None
                and last[0].group[:2] == s.group and last[0].prompt == s.prompt)
        if same and shared_tokens(last + [s]) <= budget:
            last.append(replace(s, group=last[0].group))
        else:  # a part of a group cut by the budget is a group of its own (it packs with its own prompt copy)
            part = last[0].group[2] + 1 if same else 0
            units.append([s if s.group is None else replace(s, group=(*s.group, part))])
    return units


def _prompt_runs(samples: list[Sample]) -> list[list[Sample]]:
    """Consecutive sequences of one group (one unit of prompt_units) with their shared prompt."""
    runs: list[list[Sample]] = []
    for s in samples:
        if runs and s.group is not None and runs[-1][0].group == s.group and runs[-1][0].prompt == s.prompt:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def pack_microbatch(samples: list[Sample], T: int, routing_like: torch.Tensor | None = None,
                    device: torch.device | None = None, share_prompts: bool = False) -> dict:
    """One packed THD microbatch of ``T`` tokens (see the module docstring); no samples: a filler.
    share_prompts: consecutive sequences of one group lay their prompt out once (module docstring)."""
    runs = _prompt_runs(samples) if share_prompts else [[s] for s in samples]
    if routing_like is not None and any(len(run) > 1 for run in runs):
        raise ValueError("routing replay needs each sequence's own tokens: pack without shared prompts")
    used = sum(shared_tokens(run) for run in runs)
    if used > T:
        raise ValueError(f"{used} tokens do not fit a microbatch of {T}")
    S, R = max(len(samples), 1), max((len(s.response) for s in samples), default=1)
    tokens = torch.full((T,), LABEL_PAD, dtype=torch.long)
    labels = torch.full((T,), LABEL_PAD, dtype=torch.long)
    mask, advantages, gen = torch.zeros(S, R), torch.zeros(S, R), torch.zeros(S, R)
    documents, prefix_of, scored, scored_labels, index = [], [], [], [], []
    start, i = 0, 0

    def document(ids: list[int], targets: list[int], prefix: int = -1) -> int:
        nonlocal start
        n = len(ids)
        tokens[start:start + n], labels[start:start + n] = torch.tensor(ids), torch.tensor(targets)
        documents.append(n)
        prefix_of.append(prefix)
        start += n
        return start - n

    for run in runs:
        first = run[0]
        L = len(first.prompt)
        if len(run) == 1:
            seq = list(first.prompt) + list(first.response)
            at = document(seq[:-1], seq[1:])
            predecessors = [[at + L - 1 + t for t in range(len(first.response))]]
        else:  # the prompt once; each response continues it as a document of its own
            p = len(documents)
            prompt_at = document(list(first.prompt), list(first.prompt[1:]) + [LABEL_PAD])
            predecessors = []
            for s in run:
                rest = []
                if len(s.response) > 1:
                    at = document(list(s.response[:-1]), list(s.response[1:]), prefix=p)
                    rest = [at + t for t in range(len(s.response) - 1)]
                predecessors.append([prompt_at + L - 1] + rest)
        for s, rows in zip(run, predecessors):
            r = len(s.response)
            scored.extend(rows)
            scored_labels.extend(s.response)
            index.append(torch.arange(r) + i * R)
            mask[i, :r] = 1.0
            advantages[i, :r] = s.advantage
            if s.gen_log_prob is not None:
                gen[i, :r] = s.gen_log_prob[:r].float()
            i += 1
    if used < T:
        document([LABEL_PAD] * (T - used), [LABEL_PAD] * (T - used))
    shared = any(p >= 0 for p in prefix_of)
    batch = {"tokens": tokens.unsqueeze(0), "labels": labels.unsqueeze(0),
             "position_ids": document_positions(documents, prefix_of if shared else None).unsqueeze(0),
             "scored": torch.tensor(scored, dtype=torch.long), "scored_labels": torch.tensor(scored_labels, dtype=torch.long),
             "response_index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
             "response_mask": mask, "advantages": advantages, "gen_log_prob": gen}
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
    batch["packed_seq_params"] = thd_params(documents, device, prefix_of if shared else None)
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


def _samples(rollouts: Rollouts, advantages: Advantages, mini_batches: int, rank: int) -> list[list[Sample]]:
    """This rank's trained sequences per mini-batch (filtered groups dropped)."""
    out: list[list[Sample]] = [[] for _ in range(mini_batches)]
    for i, k in enumerate(rollouts.mini_batch):
        if not bool(advantages.keep[i]):
            continue
        gen = None if rollouts.gen_log_probs is None else rollouts.gen_log_probs[i].detach().cpu()
        routing = None if rollouts.routing is None else rollouts.routing[i].cpu()
        out[k].append(Sample(rollouts.prompts[i], rollouts.responses[i], float(advantages.values[i]), gen, routing,
                             group=(rank, i // rollouts.group_size)))
    return out


def build_packed_minibatches(rollouts: Rollouts, advantages: Advantages, mini_batches: int, budget: int,
                             multiple: int = 8, dp_group=None, device: torch.device | None = None,
                             share_prompts: bool = False) -> list[MiniBatch]:
    """The update's input: one MiniBatch of packed microbatches per mini-batch index, its sequences
    balanced over DP ranks by tokens, microbatch counts and shapes the same on every DP rank.
    share_prompts: a group's sequences travel and pack together with their prompt laid out once
    (not with routing replay, which needs every sequence's own tokens)."""
    if budget < 1:
        raise ValueError(f"a packed microbatch needs a positive token budget, got {budget}")
    if dp_group is None:
        dp_group = data_parallel_group()
    share = share_prompts and not rollouts.routing
    me = group_rank(dp_group) if dp_group is not None else 0
    local = [prompt_units(mb, budget, share) for mb in _samples(rollouts, advantages, mini_batches, me)]
    sizes_local = [[(shared_tokens(u), len(u)) for u in mb] for mb in local]
    if dp_group is not None:
        gathered = gather_lengths(sizes_local, dp_group)     # [mini-batch][rank][unit] (tokens, sequences)
        lengths = [[[t for t, _ in row] for row in per_rank] for per_rank in gathered]
        sequences = [sum(n for row in per_rank for _, n in row) for per_rank in gathered]
        placements = [assign_by_tokens(per_rank) for per_rank in lengths]
        mine = exchange(local, placements, dp_group)
    else:
        lengths = [[[t for t, _ in row]] for row in sizes_local]
        sequences = [sum(n for _, n in row) for row in sizes_local]
        placements = [[[(0, i) for i in range(len(row))]] for row in sizes_local]
        mine = local
    routing_like = rollouts.routing[0] if rollouts.routing else None
    out = []
    for k, plan in enumerate(placements):
        sizes = [[lengths[k][home][i] for home, i in items] for items in plan]
        count = max(len(first_fit_bins(row, budget, "decreasing")) for row in sizes)
        rank_bins = [even_bins(row, count, budget) for row in sizes]
        fills = [sum(row[j] for j in b) for row, bins in zip(sizes, rank_bins) for b in bins]
        T = max([multiple] + [math.ceil(fill / multiple) * multiple for fill in fills])
        bins = [sorted(b) for b in rank_bins[me]] + [[] for _ in range(count - len(rank_bins[me]))]
        micro = [pack_microbatch([s for j in b for s in mine[k][j]], T, routing_like, device, share) for b in bins]
        real = sum(shared_tokens(u) for u in mine[k])
        out.append(MiniBatch(micro, T, sum(map(len, mine[k])), sequences[k],
                             computed_tokens=T * len(micro), real_tokens=real))
    return out
