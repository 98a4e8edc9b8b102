"""HF <-> megatron weight mappings, as data.

Megatron side: the layout-free keys of megatron's `sharded_state_dict()` (what torch_dist checkpoints
store). They do not depend on TP/PP/EP, nor on the layer spec: the local spec maps its norm names onto
the transformer-engine ones (`...linear_qkv.layer_norm_weight`), so one table serves both specs. Keys
of per-layer (later: per-expert) modules carry index axes that megatron prepends to the tensor:
`decoder.layers.mlp.linear_fc2.weight` is [num_layers, hidden, ffn]; megatron itself turns them into
local indices (PP stage, EP rank) when it builds shards, so a mapping only ever sees global indices.

A `WeightRule` says: the megatron tensor at `mcore[index]` is built from the HF tensors named by the
`hf` templates formatted with `index` (e.g. {layer: 3} or later {layer: 3, expert: 17}), by a
`Transform`. Every transform here is a row concatenation: the fused tensor is a list of row segments
taken from the HF tensors, so a TP slice of the fused rows maps back to slices of the HF tensors and
the round trip is bit-exact by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megagsm.models.errors import ModelInputError


@dataclass(frozen=True)
class Dims:
    """Model sizes a transform may need (from the megatron TransformerConfig)."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int


@dataclass(frozen=True)
class Segment:
    source: int  # index into WeightRule.hf
    start: int   # first row in that HF tensor
    rows: int


Shape = tuple[int, ...]


class Transform:
    """A row concatenation: `hf_shapes` says which HF shapes a fused megatron tensor of shape
    `fused` implies, `segments` lists the fused rows in order."""

    name = "copy"
    arity = 1

    def hf_shapes(self, fused: Shape, dims: Dims) -> list[Shape]:
        return [tuple(fused)]

    def segments(self, hf_shapes: list[Shape], dims: Dims) -> list[Segment]:
        return [Segment(0, 0, hf_shapes[0][0])]


class Concat(Transform):
    """Equal-size HF tensors stacked on rows; gate_up: megatron's fc1 = [gate; up] (its GLU sharded
    factory stores the global tensor in that order whatever the TP size)."""

    def __init__(self, name: str, arity: int):
        self.name, self.arity = name, arity

    def hf_shapes(self, fused, dims):
        if fused[0] % self.arity:
            raise ModelInputError(f"{self.name}: {fused[0]} rows do not split into {self.arity}")
        return [(fused[0] // self.arity, *fused[1:])] * self.arity

    def segments(self, hf_shapes, dims):
        return [Segment(i, 0, s[0]) for i, s in enumerate(hf_shapes)]


class QKV(Transform):
    """q, k, v projections -> megatron's linear_qkv: rows grouped per query group as
    [the group's query heads; its key head; its value head], so a TP rank's contiguous rows are
    whole groups. Weights and biases alike."""

    name, arity = "qkv", 3

    def hf_shapes(self, fused, dims):
        d, rest = dims.kv_channels, tuple(fused[1:])
        q = (dims.num_attention_heads * d, *rest)
        kv = (dims.num_query_groups * d, *rest)
        return [q, kv, kv]

    def segments(self, hf_shapes, dims):
        d, groups = dims.kv_channels, dims.num_query_groups
        per_group = dims.num_attention_heads // groups
        out = []
        for g in range(groups):
            out += [Segment(0, g * per_group * d, per_group * d), Segment(1, g * d, d), Segment(2, g * d, d)]
        return out


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(),
    "qkv": QKV(),
    "gate_up": Concat("gate_up", 2),
}


@dataclass(frozen=True)
class WeightRule:
    mcore: str                   # megatron sharded key, e.g. "decoder.layers.self_attention.linear_qkv.weight"
    hf: tuple[str, ...]          # HF name templates, e.g. ("model.layers.{layer}.self_attn.q_proj.weight", ...)
    transform: str = "copy"      # key of TRANSFORMS
    axes: tuple[str, ...] = ()   # index axes megatron prepends, outermost first: ("layer",), ("layer", "expert")
    vocab: bool = False          # rows are vocabulary entries: padded inside megatron, HF vocab_size on disk
    cast: bool = True            # False: exempt from an export's --dtype (HF keeps e.g. routing biases in fp32)

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"{self.mcore}: unknown transform {self.transform!r}")
        if len(self.hf) != TRANSFORMS[self.transform].arity:
            raise ValueError(f"{self.mcore}: {self.transform} takes {TRANSFORMS[self.transform].arity} HF names")

    @property
    def kind(self) -> Transform:
        return TRANSFORMS[self.transform]

    def hf_names(self, index: tuple[int, ...]) -> list[str]:
        values = dict(zip(self.axes, index))
        return [t.format(**values) for t in self.hf]


@dataclass(frozen=True)
class WeightMap:
    """A family's whole mapping for one model config."""

    rules: tuple[WeightRule, ...]
    # HF tensors that may be present and carry nothing of their own (regexes), e.g. rotary inv_freq buffers
    ignored_hf: tuple[str, ...] = ()
    # HF tensors that are knowingly not converted (regex -> why), e.g. DeepSeek's multi-token-prediction
    # layers: hf-to-mcore warns with the reason when any are present
    skipped_hf: dict[str, str] = field(default_factory=dict)
    # HF tensors that, when present, must equal another one (tied lm_head -> embed_tokens)
    tied_hf: dict[str, str] = field(default_factory=dict)

    def by_mcore(self) -> dict[str, WeightRule]:
        return {r.mcore: r for r in self.rules}


def pieces(segments: list[Segment], start: int, stop: int):
    """The HF row ranges behind fused rows [start, stop): yields (source, src_start, src_stop, out_start)."""
    row = 0
    for seg in segments:
        lo, hi = max(start, row), min(stop, row + seg.rows)
        if lo < hi:
            yield seg.source, seg.start + lo - row, seg.start + hi - row, lo - start
        row += seg.rows


def fuse(rule: WeightRule, tensors: list[torch.Tensor], dims: Dims) -> torch.Tensor:
    """HF tensors -> the fused megatron tensor for one index (in-memory; tests and small models)."""
    segs = rule.kind.segments([tuple(t.shape) for t in tensors], dims)
    return torch.cat([tensors[s.source][s.start:s.start + s.rows] for s in segs], dim=0)


def split(rule: WeightRule, fused: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    """The fused megatron tensor for one index -> its HF tensors (views where the rows are contiguous)."""
    shapes = rule.kind.hf_shapes(tuple(fused.shape), dims)
    parts: list[list[torch.Tensor]] = [[] for _ in shapes]
    row = 0
    for seg in rule.kind.segments(shapes, dims):
        parts[seg.source].append(fused[row:row + seg.rows])
        row += seg.rows
    return [p[0] if len(p) == 1 else torch.cat(p, dim=0) for p in parts]
