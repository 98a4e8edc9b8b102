"""Sequence packing of SFT samples into fixed ``seq_length`` rows.

Greedy first-fit: each sample goes into the first open bin with room (optionally visiting samples
longest first, i.e. first-fit decreasing, which wastes less). Inside a packed row every document keeps
its own next-token labels (no label crosses a boundary), position ids restart at 0 per document, and
``document_ids`` gives each token its document index (-1 for the padding tail). ``cu_seqlens`` holds
the document boundaries in the form megatron's ``PackedSeqParams`` takes (int32, starting at 0,
ending at the last real token; the padding tail comes after it): the SFT trainer feeds packed rows as
THD documents (megagsm.sft.data.packed_microbatch), so attention stays inside each document.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Sample = dict[str, torch.Tensor]


def first_fit_bins(lengths: Sequence[int], capacity: int, order: Literal["given", "decreasing"] = "given") -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity, by greedy first fit."""
    indices = list(range(len(lengths)))
    if order == "decreasing":
        indices.sort(key=lambda i: (-lengths[i], i))
    elif order != "given":
        raise ValueError(f"order must be 'given' or 'decreasing', got {order!r}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in indices:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the bin capacity {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack_group(samples: Sequence[Sample], seq_length: int, pad_id: int) -> Sample:
    """One packed row of ``seq_length`` tokens from samples whose lengths sum to at most ``seq_length``."""
    input_ids = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(seq_length, dtype=torch.float32)
    position_ids = torch.zeros(seq_length, dtype=torch.long)
    document_ids = torch.full((seq_length,), -1, dtype=torch.long)
    boundaries = [0]
    start = 0
    for doc, sample in enumerate(samples):
        n = len(sample["input_ids"])
        end = start + n
        if end > seq_length:
            raise ValueError(f"packed samples need {end} tokens, more than seq_length={seq_length}")
        input_ids[start:end] = sample["input_ids"]
        labels[start:end] = sample["labels"]
        loss_mask[start:end] = sample["loss_mask"]
        position_ids[start:end] = torch.arange(n)
        document_ids[start:end] = doc
        boundaries.append(end)
        start = end
    position_ids[start:] = torch.arange(seq_length - start)
    lengths = [b - a for a, b in zip(boundaries, boundaries[1:])]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
        "max_seqlen": torch.tensor(max(lengths) if lengths else 0, dtype=torch.int32),
    }


def pack_samples(
    samples: Sequence[Sample], seq_length: int, pad_id: int, order: Literal["given", "decreasing"] = "given"
) -> list[Sample]:
    bins = first_fit_bins([len(s["input_ids"]) for s in samples], seq_length, order)
    return [pack_group([samples[i] for i in group], seq_length, pad_id) for group in bins]


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of packed rows built once from a dataset of samples (e.g. :class:`SFTDataset`)."""

    def __init__(self, samples: Sequence[Sample], seq_length: int, pad_id: int, order: Literal["given", "decreasing"] = "decreasing"):
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.rows = pack_samples([samples[i] for i in range(len(samples))], seq_length, pad_id, order)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        return self.rows[index]


def collate_packed(rows: Sequence[Sample]) -> dict:
    """Stack packed rows into ``[B, S]`` tensors; ``cu_seqlens`` stays a list (lengths differ per row)."""
    out: dict = {key: torch.stack([r[key] for r in rows]) for key in
                 ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")}
    out["cu_seqlens"] = [r["cu_seqlens"] for r in rows]
    out["max_seqlen"] = torch.stack([r["max_seqlen"] for r in rows]).max()
    return out
