"""THD attention as a few padded SDPA batches: a packed row's documents grouped by length.

SDPAttention's THD input is [t, heads, dim] q/k/v whose documents are delimited by `cu_seqlens`. One
SDPA call per document pays a call (a kernel launch on GPU) per document and per layer, which adds up
for the hundreds of short sequences of a GSPO microbatch; one call with a [t, t] block-diagonal mask
pays O(t^2). Here the documents, sorted by length, are cut into buckets whose longest document is at
most `RATIO` times the shortest (documents of at most `FLOOR` tokens all share one bucket: their
attention is cheap next to a call); each bucket is gathered into a right-padded [n, heads, L, dim]
batch for one SDPA call, and the real rows are gathered back. A row of equal-length documents is one
bucket and a view of q/k/v: nothing is copied.

Right padding needs no key mask under causal attention: a document's padding keys come after every
one of its real queries, so the causal mask alone hides them (non-causal attention gets a key-length
mask). Padding slots are zeros (constants) and their outputs are dropped, so each token's gradient is
that of its one real slot: both directions are gathers (index_select), never the zero-filled
full-size scatter-add that autograd's own index backward costs per bucket.

Shared prefixes (`megagsm.models.packed_seq.document_prefixes`: a GSPO prompt laid out once, each of
its responses a document continuing it): attention sees a continuation as the prefix's tokens followed
by its own, so its slots read the prefix's rows again. The first continuation gives the prefix tokens'
outputs; in the others those slots are keys and values only (their outputs are dropped, no output
gradient reaches them), and their q/k/v gradients are added to the prefix tokens' (`repeat_slots`).

The plan is built on the host from `cu_seqlens` (one device-to-host copy) and kept for the few
`cu_seqlens` tensors seen last, keyed by the tensor itself and its in-place version counter: every
layer of a forward reads the same `PackedSeqParams`, so the copy happens once per forward, not once
per layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from megagsm.models.packed_seq import document_prefixes

RATIO = 1.2   # a bucket's longest document / its shortest (measured, see SDPAttention's docstring)
FLOOR = 32    # documents this short share one bucket whatever their lengths
_CACHE_SIZE = 4


@dataclass(frozen=True)
class Bucket:
    n: int                    # documents
    length: int               # L: every document padded to it
    tokens: torch.Tensor      # [m] the tokens whose output the bucket gives (rows of the packed q/k/v)
    slots: torch.Tensor       # [m] the slot (of the n * L) holding each of them
    gather: torch.Tensor      # [n * L] the token each slot reads (padding: its document's last, then zeroed)
    padding: torch.Tensor     # [n * L - m - repeats] the padding slots
    key_lengths: torch.Tensor  # [n] each document's length (the key mask of non-causal attention)
    # shared prefixes: slots that read a prefix token again (its keys and values; their outputs are
    # dropped), with the token each reads; empty without prefixes
    repeat_slots: torch.Tensor
    repeat_tokens: torch.Tensor
    dropped: torch.Tensor     # padding + repeat slots: no output gradient reaches them


@dataclass(frozen=True)
class Plan:
    tokens: int
    buckets: tuple[Bucket, ...]
    identity: bool            # one bucket of equal-length documents: its batch is a view of q/k/v
    shared: bool              # some slots repeat a prefix's tokens (document_prefixes)
    ordered: bool             # one bucket whose output slots are in token order (its rows need no scatter)


def bucket_documents(lengths: list[int], ratio: float = RATIO, floor: int = FLOOR) -> list[list[int]]:
    """Document indices grouped into buckets, longest first, each in token order (module docstring)."""
    by_length = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    cap = None
    for i in by_length:
        if cap is None or (lengths[i] * ratio < cap and cap > floor):
            buckets.append([])
            cap = lengths[i]
        buckets[-1].append(i)
    return [sorted(b) for b in buckets]


def attention_documents(bounds: list[int], prefix_of: tuple[int, ...] | None = None) -> list[tuple[list[int], int]]:
    """The documents attention sees, as (packed token indices, how many leading ones are repeats): each
    document alone, or a document with a prefix as the prefix's tokens followed by its own. A prefix
    gives its own outputs through its first continuation (no repeat there) and is not a document of
    its own unless nothing continues it."""
    spans = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    if prefix_of is None:
        return [(span, 0) for span in spans]
    continued = {p for p in prefix_of if p >= 0}
    first = {}
    docs = []
    for d, span in enumerate(spans):
        p = prefix_of[d]
        if d in continued:
            continue
        if p < 0:
            docs.append((span, 0))
        else:
            repeat = 0 if first.setdefault(p, d) == d else len(spans[p])
            docs.append((spans[p] + span, repeat))
    return docs


def build_plan(bounds: list[int], device: torch.device, ratio: float = RATIO, floor: int = FLOOR,
               prefix_of: tuple[int, ...] | None = None) -> Plan:
    """The buckets of documents [bounds[i], bounds[i+1]) of a packed row (continuing their prefixes,
    see attention_documents), with their index maps."""
    if len(bounds) < 2 or bounds[0] != 0 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0, one non-empty document after another")
    if prefix_of is None:  # each document alone: `flat` is the row itself
        flat = torch.arange(bounds[-1])
        firsts = torch.tensor(bounds[:-1])
        lengths = torch.tensor(bounds[1:]) - firsts
        repeats = torch.zeros_like(lengths)
    else:
        docs = attention_documents(bounds, prefix_of)
        lengths = torch.tensor([len(tokens) for tokens, _ in docs])
        repeats = torch.tensor([repeat for _, repeat in docs])
        # (through numpy: torch.tensor of a long Python list costs ~7x as much)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(t for t, _ in docs), dtype=np.int64))
        firsts = torch.cumsum(lengths, 0) - lengths   # where each document begins in `flat`
    groups = bucket_documents(lengths.tolist(), ratio, floor)
    buckets, outputs = [], []
    for members in groups:
        idx = torch.tensor(members)
        doc_lengths = lengths[idx]
        L = int(doc_lengths.max())
        offset = torch.arange(L)
        # padding slots read their document's last token (then zeroed)
        gather = flat[firsts[idx, None] + torch.minimum(offset, doc_lengths[:, None] - 1)].reshape(-1)
        real = (offset < doc_lengths[:, None]).reshape(-1)
        repeated = (offset < repeats[idx, None]).reshape(-1)
        own = (real & ~repeated).nonzero().squeeze(1)
        repeat_slots = repeated.nonzero().squeeze(1)
        outputs.append(gather[own])
        buckets.append(Bucket(
            n=len(members), length=L, tokens=gather[own].to(device), slots=own.to(device),
            gather=gather.to(device), padding=(~real).nonzero().squeeze(1).to(device),
            key_lengths=doc_lengths.to(device), repeat_slots=repeat_slots.to(device),
            repeat_tokens=gather[repeat_slots].to(device), dropped=(~real | repeated).nonzero().squeeze(1).to(device)))
    shared = any(b.repeat_slots.numel() for b in buckets)
    identity = len(buckets) == 1 and bool((lengths == lengths[0]).all()) and prefix_of is None
    ordered = len(outputs) == 1 and torch.equal(outputs[0], torch.arange(bounds[-1]))
    return Plan(tokens=bounds[-1], buckets=tuple(buckets), identity=identity, shared=shared, ordered=ordered)


_plans: dict[int, tuple[torch.Tensor, int, torch.device, Plan]] = {}


def plan_for(cu_seqlens: torch.Tensor, tokens: int, device: torch.device) -> Plan:
    """build_plan for these cu_seqlens of a row of `tokens` tokens, reused while the same tensor is
    unchanged (module docstring)."""
    hit = _plans.get(id(cu_seqlens))
    if hit is not None and hit[0] is cu_seqlens and hit[1:3] == (cu_seqlens._version, device):
        plan = hit[3]
    else:
        plan = build_plan(cu_seqlens.tolist(), device, prefix_of=document_prefixes(cu_seqlens))
        if len(_plans) >= _CACHE_SIZE:
            _plans.pop(next(iter(_plans)))
        _plans[id(cu_seqlens)] = (cu_seqlens, cu_seqlens._version, device, plan)
    if plan.tokens != tokens:
        raise ValueError(f"cu_seqlens end at {plan.tokens} tokens, the packed q/k/v hold {tokens}")
    return plan


def _padded(x: torch.Tensor, bucket: Bucket, zeroed: torch.Tensor | None = None) -> torch.Tensor:
    """[t, ...] -> the bucket's [n, L, ...] rows, zero in the padding slots (or in `zeroed`)."""
    rows = x.index_select(0, bucket.gather).index_fill_(0, bucket.padding if zeroed is None else zeroed, 0)
    return rows.view(bucket.n, bucket.length, *x.shape[1:])


def _unpadded(batches, plan: Plan, shape) -> torch.Tensor:
    """The buckets' [n, L, ...] rows -> [t, ...] (shape) in token order, each token from the slot that
    gives its output. SDPA's outputs and gradients are laid out [n, L, heads, dim] already, so each
    reshape is a view. (autograd hands a Function zeros, never None, for outputs without gradient.)"""
    rows = [x.reshape(b.n * b.length, *x.shape[2:]).index_select(0, b.slots) for b, x in zip(plan.buckets, batches)]
    if plan.ordered:
        return rows[0]
    out = rows[0].new_empty(shape)  # every token has exactly one such slot
    for b, r in zip(plan.buckets, rows):
        out.index_copy_(0, b.tokens, r)
    return out


class _ToBuckets(torch.autograd.Function):
    """[t, heads, dim] -> each bucket's [n, heads, L, dim]. Padding slots are constants (zeros), so
    the gradient of a token is that of its one real slot: a gather, not a zero-filled scatter-add;
    a prefix token read again by other documents (their keys and values) adds those slots' gradients."""

    @staticmethod
    def forward(ctx, x, plan):
        ctx.plan, ctx.shape = plan, x.shape
        return tuple(_padded(x, b).transpose(1, 2) for b in plan.buckets)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.transpose(1, 2) for g in grads]
        out = _unpadded(grads, ctx.plan, ctx.shape)
        if ctx.plan.shared:
            for b, g in zip(ctx.plan.buckets, grads):
                if b.repeat_slots.numel():
                    rows = g.reshape(b.n * b.length, *g.shape[2:]).index_select(0, b.repeat_slots)
                    out = out.index_add_(0, b.repeat_tokens, rows)
        return out, None


class _FromBuckets(torch.autograd.Function):
    """Each bucket's [n, heads, L, dv] attention output -> [t, heads, dv], its real rows in token
    order; the backward sends zero to the padding slots, whose outputs nothing reads."""

    @staticmethod
    def forward(ctx, plan, *contexts):
        ctx.plan = plan
        shape = (plan.tokens, contexts[0].shape[1], contexts[0].shape[3])
        return _unpadded([c.transpose(1, 2) for c in contexts], plan, shape)

    @staticmethod
    def backward(ctx, grad):
        return (None, *(_padded(grad, b, b.dropped).transpose(1, 2) for b in ctx.plan.buckets))


def to_buckets(x: torch.Tensor, plan: Plan) -> list[torch.Tensor]:
    """[t, heads, dim] -> each bucket's right-padded [n, heads, L, dim] (4-D: SDPA's fused CPU
    kernel needs it)."""
    if plan.identity:
        (b,) = plan.buckets
        return [x.view(b.n, b.length, *x.shape[1:]).transpose(1, 2)]
    return list(_ToBuckets.apply(x, plan))


def from_buckets(contexts: list[torch.Tensor], plan: Plan) -> torch.Tensor:
    """The buckets' [n, heads, L, dv] attention outputs -> [t, heads * dv] in token order."""
    if plan.identity:
        (c,) = contexts
        return c.transpose(1, 2).reshape(plan.tokens, c.shape[1] * c.shape[3])
    out = _FromBuckets.apply(plan, *contexts)
    return out.reshape(plan.tokens, -1)
