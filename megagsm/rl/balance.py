"""Token-balanced placement of a mini-batch's sequences over data-parallel ranks.

Rollouts are placed by prompt group (megagsm.rl.rollout: whole groups per rank, so advantages need no
communication); their lengths are not, so one rank can hold most of a mini-batch's tokens and the
others wait for it. Once advantages are known, each sequence is a self-contained item (tokens,
advantage, sampler log-probs, routing) that may train on any rank: the loss is a global sum over a
global count (megagsm.rl.update), so where a sequence lands changes nothing but the summation order.

`assign_by_tokens` is a pure function of every rank's sequence lengths (all ranks compute the same
plan from one all-gather of the lengths): sequences, longest first, stay on their home rank while it
is under the mean load and otherwise go to the least-loaded rank. Every rank ends within one
sequence of the mean, and sequences move only where the balance needs it. `exchange` then moves
them with one object all-gather (skipped when nothing moves).
"""
from __future__ import annotations

import math
from typing import Any

from megagsm.runtime.collectives import gather_objects, group_rank

Placement = list[list[tuple[int, int]]]  # per destination rank: (home rank, index there), sorted


def assign_by_tokens(lengths: list[list[int]]) -> Placement:
    """lengths[r][i]: tokens of home rank r's i-th sequence -> for every rank, the (home, i) it trains."""
    ranks = len(lengths)
    target = math.ceil(sum(map(sum, lengths)) / ranks)
    items = sorted(((n, r, i) for r, row in enumerate(lengths) for i, n in enumerate(row)),
                   key=lambda item: (-item[0], item[1], item[2]))
    loads = [0] * ranks
    placed: Placement = [[] for _ in range(ranks)]
    for n, home, i in items:
        dest = home if loads[home] + n <= target else min(range(ranks), key=lambda r: (loads[r], r))
        loads[dest] += n
        placed[dest].append((home, i))
    return [sorted(p) for p in placed]


def gather_lengths(local: list[list[int]], group=None) -> list[list[list[int]]]:
    """Per mini-batch, every rank's sequence lengths: [mini-batch][rank][i]."""
    per_rank = gather_objects(local, group)
    return [[per_rank[r][k] for r in range(len(per_rank))] for k in range(len(local))]


def exchange(local: list[list[Any]], placements: list[Placement], group=None) -> list[list[Any]]:
    """This rank's items per mini-batch after the placements (one per mini-batch), in placement
    order. Items must be picklable with their tensors on the CPU."""
    me = group_rank(group)
    moving = any(home != dest for plan in placements for dest, items in enumerate(plan) for home, _ in items)
    received: dict = {}
    if moving:  # (one rank never moves anything)
        outgoing = {(k, me, i): local[k][i] for k, plan in enumerate(placements)
                    for dest, items in enumerate(plan) if dest != me for home, i in items if home == me}
        for part in gather_objects(outgoing, group):
            received.update(part)
    return [[local[k][i] if home == me else received[(k, home, i)] for home, i in plan[me]]
            for k, plan in enumerate(placements)]
