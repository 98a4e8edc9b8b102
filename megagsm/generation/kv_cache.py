"""The KV cache: megatron's StaticInferenceContext, sized and allocated up front, with row moves.

megatron's attention layers allocate their cache lazily, on the first forward, through the context
(`key_value_memory_dict[layer_number] = (K, V)`, each [max_seq, max_batch, kv_groups/rank, head_dim]).
`KVCache` fills that dict before any forward with the attention layers' own `_allocate_memory`, after
checking the total against a memory budget, so a batch that does not fit fails at once with the
numbers instead of part-way through the prefill.

Rows can be moved (`move_rows`, to close the holes finished sequences leave, so they stop costing
compute) and copied (`expand_rows`, n samples of one prefilled prompt). generate() shares positions
over all rows (static batching: one `sequence_len_offset`), which is why it left-aligns prompts;
generate_refilled() gives every row its own write column (`row_columns`, see rope_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention

GIB = 1024**3


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class KVCacheTooLarge(RuntimeError):
    pass


@dataclass(frozen=True)
class CacheShape:
    layers: int          # attention layers on this rank (this pipeline stage)
    kv_groups: int       # KV heads per tensor-parallel rank
    key_dim: int
    value_dim: int
    bytes_per_elem: int

    def bytes(self, batch: int, seq: int) -> int:
        return self.layers * batch * seq * self.kv_groups * (self.key_dim + self.value_dim) * (
            self.bytes_per_elem
        )

    def describe(self, batch: int, seq: int) -> str:
        return (
            f"{self.layers} layers x (K {self.key_dim} + V {self.value_dim} dims) x "
            f"{self.kv_groups} KV heads/rank x {self.bytes_per_elem} bytes x batch {batch} x "
            f"{seq} positions"
        )


def attention_layers(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def cache_shape(model, dtype: torch.dtype) -> CacheShape:
    layers = attention_layers(model)
    if not layers:  # a pipeline stage can hold no layers (embedding/output only)
        return CacheShape(0, 0, 0, 0, torch.finfo(dtype).bits // 8)
    first = layers[0]
    return CacheShape(
        layers=len(layers),
        kv_groups=first.num_query_groups_per_partition,
        key_dim=first.key_hidden_size,
        value_dim=first.val_hidden_size,
        bytes_per_elem=torch.finfo(dtype).bits // 8,
    )


def free_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes the cache may use, where that number comes from)."""
    if device.type == "cuda":
        # after a training step the caching allocator keeps its peak reserved: hand back what it can,
        # then count what it still holds unused (it serves the cache's allocations from there first)
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, (f"free memory on {device}: {format_bytes(free)} free on the device "
                               f"(torch.cuda.mem_get_info) + {format_bytes(cached)} reserved but unused by "
                               f"torch's caching allocator, after torch.cuda.empty_cache()")
    import psutil

    return psutil.virtual_memory().available, "available host memory (psutil)"


def check_fits(model, max_batch: int, max_seq: int, dtype: torch.dtype, device: torch.device,
               extra_bytes: int = 0, budget_bytes: int | None = None,
               memory_fraction: float = 0.9) -> str | None:
    """None when the cache fits this rank's budget, else the error message with the numbers."""
    shape = cache_shape(model, dtype)
    need = shape.bytes(max_batch, max_seq)
    if budget_bytes is None:
        free, source = free_memory_bytes(device)
        budget_bytes, source = int(free * memory_fraction), f"{memory_fraction:.0%} of {source}"
    else:
        source = "the given budget (kv_cache_bytes)"
    if need + extra_bytes <= budget_bytes:
        return None
    return (
        f"the KV cache for batch {max_batch} x {max_seq} positions needs {format_bytes(need)} "
        f"({shape.describe(max_batch, max_seq)} = {need} bytes) plus {format_bytes(extra_bytes)} for "
        f"logits, but only {format_bytes(budget_bytes)} is available ({source}). Lower the batch "
        f"(prompts x n), the prompt length or max_new_tokens, or pass a larger kv_cache_bytes."
    )


class KVCache(StaticInferenceContext):
    """A StaticInferenceContext whose buffers exist before the first forward (size them with
    check_fits first: allocation itself does not check). zeroed: the buffers start as zeros, for
    attention over columns a row has not written (per-row decoding masks them, but a masked score
    still multiplies its value: garbage NaN/Inf in never-written memory would reach the output)."""

    def __init__(self, model, max_batch: int, max_seq: int, dtype: torch.dtype, device: torch.device,
                 zeroed: bool = False):
        super().__init__(max_batch_size=max_batch, max_sequence_length=max_seq)
        self.shape = cache_shape(model, dtype)
        self.nbytes = self.shape.bytes(max_batch, max_seq)
        self.keys_rotated = False  # set by rope_cache.rope_once: keys are stored after RoPE
        # per-row decoding (generate_refilled): row r's new key goes to column row_columns[r] (device
        # tensors, so a captured CUDA graph reads them at replay); attention sees columns [0, key_width)
        self.row_columns: torch.Tensor | None = None
        self.row_index: torch.Tensor | None = None
        self.key_width = 0

        def buffer(attn, dim):
            # megatron indexes [seq, batch, groups, dim]; stored batch-major underneath so that one
            # row's keys are contiguous for the attention matmuls and row moves copy whole blocks
            groups = attn.num_query_groups_per_partition
            alloc = torch.zeros if zeroed else torch.empty
            return alloc(max_batch, groups, max_seq, dim, dtype=dtype, device=device).permute(
                2, 0, 1, 3
            )

        for attn in attention_layers(model):
            self.key_value_memory_dict[attn.layer_number] = (
                buffer(attn, attn.key_hidden_size), buffer(attn, attn.val_hidden_size)
            )

    @torch.no_grad()
    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, upto: int | None = None) -> None:
        """Copies rows src -> dst for positions [0, upto) (default: those written so far; src and dst
        disjoint)."""
        if src.numel() == 0:
            return
        upto = self.sequence_len_offset if upto is None else upto
        for key, value in self.key_value_memory_dict.values():
            key[:upto, dst] = key[:upto, src]
            value[:upto, dst] = value[:upto, src]

    @torch.no_grad()
    def expand_rows(self, rows: int, n: int, first: int = 0, upto: int | None = None) -> None:
        """Rows first + [0, rows) become rows first + [0, rows*n), each repeated n times in place
        (i -> i*n .. i*n+n-1), for positions [0, upto) (default: those written so far)."""
        if n == 1:
            return
        upto = self.sequence_len_offset if upto is None else upto
        index = torch.arange(first, first + rows, device=self._device()).repeat_interleave(n)
        for key, value in self.key_value_memory_dict.values():
            key[:upto, first: first + rows * n] = key[:upto, index]
            value[:upto, first: first + rows * n] = value[:upto, index]

    @torch.no_grad()
    def shift_rows_right(self, shifts: torch.Tensor, length: int, rotate=None) -> None:
        """Right-aligns row i's first length - shifts[i] positions (a right-padded prefill becomes the
        left-padded layout decoding needs). Every key of a row moves by the same amount, so relative
        positions, all RoPE attention sees, are unchanged: un-rotated keys (megatron's layout) just
        move; rotated keys (`keys_rotated`) are also turned by the shift with `rotate(keys, shift)`."""
        for row in torch.nonzero(shifts).flatten().tolist():
            s = int(shifts[row])
            for key, value in self.key_value_memory_dict.values():
                moved = key[: length - s, row].clone()
                if self.keys_rotated:
                    moved = rotate(moved.unsqueeze(1), s).squeeze(1)
                key[s:length, row] = moved
                value[s:length, row] = value[: length - s, row].clone()

    def _device(self):
        for key, _ in self.key_value_memory_dict.values():
            return key.device
        return torch.device("cpu")

    def release(self) -> None:
        self.key_value_memory_dict.clear()
