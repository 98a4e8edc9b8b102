"""LoRA: low-rank adapters on megatron-core's tensor-parallel linears, TP- and SP-correct.

`apply_lora(model_chunks, cfg)` freezes every parameter of the model and puts an adapter next to each
targeted `ColumnParallelLinear` / `RowParallelLinear` (megatron names: linear_qkv, linear_proj,
linear_fc1, linear_fc2). The adapted linear computes `base(x) + (alpha / rank) * B(A(dropout(x)))`,
with B initialised to zero so the adapted model starts out identical to the base model. Call it before
DDP wrapping: megatron's DDP and optimizer only take parameters that require grad, so they hold the
adapters alone. `merge_lora(model_chunks)` folds `scale * B @ A` into each base weight and removes the
adapters, leaving plain megatron modules with their original parameter names (for export).

How the adapters follow megatron's tensor parallelism (t = TP size, s = sequence, r = rank):
* ColumnParallelLinear (weight [out/t, in], output split over t): A [r, in] is replicated, B [out/t, r]
  holds the same output rows as the base weight on this rank (so for the fused qkv and [gate; up] fc1
  weights B adapts exactly this rank's slice of the fused output). The r-wide A(x) crosses into the
  TP region the way the base input does: identity forward / all-reduce backward, or, with sequence
  parallelism, an all-gather over the sequence (forward) / reduce-scatter (backward). Only r
  channels travel, not the hidden size.
* RowParallelLinear (weight [out, in/t], input split over t): A [r, in/t] holds this rank's input
  columns, so A(x) is a partial sum that is all-reduced (or reduce-scattered over the sequence with
  sequence parallelism) exactly like the base output; B [out, r] is replicated.
* With sequence parallelism the replicated factor (column A, row B) only sees this rank's tokens; it
  is flagged `sequence_parallel` so that megatron's `finalize_model_grads` sums its gradient over TP,
  as it does for norm weights. Sharded factors carry megatron's tensor-parallel attributes so the
  grad-norm counts them once per rank and replicated ones once in all.

Adapter weights appear in `sharded_state_dict()` under `<linear>_lora.weight_a/.weight_b` with global
(layout-free) shapes, fc1's B split into [gate; up] halves like the base weight, so checkpoints and
`megagsm.runtime.sharded` work across layouts. A is initialised from a generator seeded by the layer's
global number and the module path, so every TP/PP layout starts from the same adapters.
"""
from __future__ import annotations

import contextlib
import logging
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megagsm.config.train import LoraConfig
from megagsm.models.gpt import unwrap_model

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = "_lora"


class LoraAdapter(torch.nn.Module):
    """The low-rank branch of one megatron linear; registered as the linear's sibling `<name>_lora`."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, dropout: float,
                 full_a: torch.Tensor, glu: bool):
        super().__init__()
        self.kind = "column" if isinstance(base, ColumnParallelLinear) else "row"
        self.rank = rank
        self.scaling = alpha / rank
        self.glu = glu  # fc1 of a gated MLP: B's rows are [gate; up] per rank, like the base weight
        self.tp_group = base.tp_group
        self.tp_size = base.tp_group.size() if base.tp_group is not None else 1
        self.sequence_parallel = bool(base.sequence_parallel) and self.tp_size > 1
        self.gather_output = getattr(base, "gather_output", False)
        self.input_is_parallel = getattr(base, "input_is_parallel", True)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else None
        self.enabled = True  # False: the linear computes its base output alone (adapters_disabled)
        weight = base.weight
        factory = dict(dtype=weight.dtype, device=weight.device)
        out_local, in_local = weight.shape
        if self.kind == "column":
            a = full_a
            b_shape = (out_local, rank)
        else:
            tp_rank = base.tp_group.rank() if self.tp_size > 1 else 0
            a = full_a.narrow(1, tp_rank * in_local, in_local)
            b_shape = (out_local, rank)
        self.weight_a = torch.nn.Parameter(a.to(**factory).contiguous())
        self.weight_b = torch.nn.Parameter(torch.zeros(b_shape, **factory))
        sharded, replicated = (
            (self.weight_b, self.weight_a) if self.kind == "column" else (self.weight_a, self.weight_b)
        )
        if self.tp_size > 1:
            set_tensor_model_parallel_attributes(sharded, True, 0 if self.kind == "column" else 1, 1)
        # finalize_model_grads sums this over TP when sequence parallelism is on
        replicated.sequence_parallel = self.sequence_parallel

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is None or not self.training:
            return x
        # inputs that differ across TP ranks (row input shards, sequence-parallel shards) draw from the
        # model-parallel RNG stream; a column input replicated over TP uses the shared default stream,
        # as megatron does for its own dropouts
        if self.tp_size > 1 and (self.kind == "row" or self.sequence_parallel):
            with get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)

    def forward(self, x: torch.Tensor, runtime_gather_output: bool | None = None) -> torch.Tensor:
        tp = self.tp_size > 1
        if self.kind == "column":
            h = F.linear(self._dropout(x), self.weight_a) * self.scaling
            if tp:
                h = (gather_from_sequence_parallel_region(h, True, group=self.tp_group)
                     if self.sequence_parallel else
                     copy_to_tensor_model_parallel_region(h, group=self.tp_group))
            y = F.linear(h, self.weight_b)
            gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
            if tp and gather:
                y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
            return y
        if tp and not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
        h = F.linear(self._dropout(x), self.weight_a) * self.scaling
        if tp:
            h = (reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel else
                 reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.weight_b)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32, shaped like this rank's base weight shard."""
        return (self.weight_b.float() @ self.weight_a.float()) * self.scaling

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        state = self.state_dict(prefix="", keep_vars=True)
        groups = {}
        if metadata is not None and "dp_cp_group" in metadata:
            groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        axis = {"weight_b": 0} if self.kind == "column" else {"weight_a": 1}
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets, **groups)
        if self.glu:
            key = f"{prefix}weight_b"
            singleton = (metadata or {}).get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


def _lora_hook(adapter: LoraAdapter):
    def hook(module, args, kwargs, output):
        if not adapter.enabled:
            return None  # the base linear's own output, untouched
        x = args[0] if args else kwargs["input_"]
        out, bias = output
        return out + adapter(x, kwargs.get("runtime_gather_output")), bias

    return hook


def _init_a(rank: int, in_features: int, key: str, seed: int) -> torch.Tensor:
    """peft's A init (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from a generator that
    depends only on the seed and the layer's global identity, never on the parallel layout."""
    gen = torch.Generator().manual_seed((zlib.crc32(key.encode()) + 7919 * seed) % (2**63))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def _transformer_layers(chunk):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return [m for m in chunk.modules() if isinstance(m, TransformerLayer)]


def _targets_in_layer(layer, targets):
    """(parent, child name, child, path in layer) for each targeted linear outside MoE experts."""
    found = []
    for parent_name, parent in layer.named_modules():
        if ".experts" in f".{parent_name}" or parent_name.startswith("experts"):
            continue
        for name, child in parent.named_children():
            if name not in targets:
                continue
            if getattr(child, "is_expert", False):
                continue
            if not isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                raise ValueError(
                    f"train.lora.targets: {parent_name}.{name} is a {type(child).__name__}; LoRA wraps "
                    "megatron's ColumnParallelLinear/RowParallelLinear (the local layer spec). "
                    "transformer-engine's fused layernorm-linear modules are not supported."
                )
            found.append((parent, name, child, f"{parent_name}.{name}".lstrip(".")))
    return found


def apply_lora(model_chunks: list, lora_cfg: LoraConfig, seed: int = 0) -> list:
    """Freeze `model_chunks` (unwrapped GPTModels, before DDP) and attach adapters; returns the chunks.

    Targets are megatron linear names (`lora_cfg.targets`); linears inside MoE experts are left
    without adapters (logged). Raises ValueError naming the field on a bad rank/target."""
    if lora_cfg.rank < 1:
        raise ValueError(f"train.lora.rank must be >= 1, got {lora_cfg.rank}")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ValueError(f"train.lora.dropout must be in [0, 1), got {lora_cfg.dropout}")
    allowed = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    bad = [t for t in lora_cfg.targets if t not in allowed]
    if bad or not lora_cfg.targets:
        raise ValueError(f"train.lora.targets: {bad or '[]'} not allowed (choose from {list(allowed)})")
    targets = set(lora_cfg.targets)
    matched = set()
    for chunk in model_chunks:
        module = unwrap_model(chunk)
        for param in module.parameters():
            param.requires_grad_(False)
        for layer in _transformer_layers(module):
            glu = bool(layer.config.gated_linear_unit)
            for parent, name, linear, path in _targets_in_layer(layer, targets):
                if hasattr(parent, name + ADAPTER_SUFFIX):
                    raise ValueError(f"layer {layer.layer_number} {path}: LoRA already applied")
                full_a = _init_a(lora_cfg.rank, linear.input_size,
                                 f"{layer.layer_number}.{path}", seed)
                adapter = LoraAdapter(linear, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, full_a,
                                      glu=glu and name == "linear_fc1")
                parent.add_module(name + ADAPTER_SUFFIX, adapter)
                adapter._hook = linear.register_forward_hook(_lora_hook(adapter), with_kwargs=True)
                matched.add(name)
    if model_chunks and not matched:
        raise ValueError(f"train.lora.targets {sorted(targets)}: no such linear in the model")
    return model_chunks


def lora_parameters(model_chunks) -> dict[str, torch.nn.Parameter]:
    """name -> adapter parameter, over all chunks (names as in the unwrapped chunk)."""
    out = {}
    for i, chunk in enumerate(model_chunks):
        for name, param in unwrap_model(chunk).named_parameters():
            if ADAPTER_SUFFIX + "." in name:
                out[name if len(model_chunks) == 1 else f"{i}.{name}"] = param
    return out


@torch.no_grad()
def merge_lora(model_chunks: list) -> list:
    """Fold every adapter into its base weight (W += alpha/rank * B @ A, per TP shard, no
    communication) and remove it; the chunks are then plain megatron modules with the original
    parameter names. Base parameters stay frozen."""
    for chunk in model_chunks:
        module = unwrap_model(chunk)
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, LoraAdapter):
                    continue
                base = getattr(parent, name[: -len(ADAPTER_SUFFIX)])
                base.weight.add_(child.delta_weight().to(base.weight.dtype))
                child._hook.remove()
                delattr(parent, name)
    return model_chunks


def lora_adapters(model_chunks) -> list[LoraAdapter]:
    """Every adapter of the chunks (wrapped or not), in module order."""
    return [m for chunk in model_chunks for m in unwrap_model(chunk).modules() if isinstance(m, LoraAdapter)]


@contextlib.contextmanager
def _adapters_set(model_chunks, attribute: str, value):
    adapters = lora_adapters(model_chunks)
    previous = [getattr(a, attribute) for a in adapters]
    for a in adapters:
        setattr(a, attribute, value)
    try:
        yield
    finally:
        for a, old in zip(adapters, previous):
            setattr(a, attribute, old)


def adapters_disabled(model_chunks):
    """For the duration the model is its frozen base: every adapted linear returns its base output,
    bit for bit (the adapter branch is skipped, not multiplied by zero). Nothing is copied, so the
    base model costs no memory; GSPO's KL reference policy is this. Collective-free."""
    return _adapters_set(model_chunks, "enabled", False)


def adapter_dropout_disabled(model_chunks):
    """Adapters skip their dropout for the duration, whatever the model's train/eval mode (the rest
    of the model keeps its mode). RL updates use it: an importance ratio compares the policy that
    sampled with the one being trained, and dropout noise in one of them would be clipped as if it
    were a policy change."""
    return _adapters_set(model_chunks, "training", False)
