"""SFT data for the trainer: tokenised samples (padded or packed) and a resumable stream of per-step microbatches for this data-parallel rank.

Each optimizer step takes `global_batch_size` sequences: this DP rank's share, cut into
`num_microbatches` microbatches of `micro_batch_size` (gradient accumulation). All microbatches of a
step are padded to one length (the step's longest sample, rounded up to a multiple of 8 and of what
sequence/context parallelism need, at most `data.seq_length`), since pipeline stages exchange
activations of a fixed shape within a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megagsm.config.data import DataConfig
from megagsm.data.gsm8k import GSM8KExample
from megagsm.data.packing import PackedDataset, packed_attention_mask
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import SFTDataset, collate_sft


def build_dataset(examples: list[GSM8KExample], tokenizer, data: DataConfig, name: str):
    samples = SFTDataset(examples, tokenizer, data.seq_length, template=data.prompt_template,
                         truncation=data.truncation, source_name=name)
    if data.pack_sequences:
        return PackedDataset(samples, data.seq_length, samples.pad_id)
    return samples


def check_packing_supported(pack_sequences: bool, model_chunks) -> None:
    """Packed rows are kept apart by a dense per-document mask under the layers' causal mask type:
    megagsm's SDPA attention applies it, transformer-engine's ignores it (it applies attention_mask
    only for padding*/arbitrary mask types), so under TE documents would attend to each other.
    (Packing through THD `packed_seq_params` with cu_seqlens is what TE needs; not wired yet.)"""
    from megagsm.config.errors import ConfigError
    from megagsm.layers.spec import applies_masks_of_any_type

    if pack_sequences and not applies_masks_of_any_type(model_chunks):
        raise ConfigError("data.pack_sequences=true needs an attention that applies the per-document mask: "
                          "transformer-engine's ignores it with a causal mask type (documents would attend "
                          "to each other); use model.attention_backend=sdpa or data.pack_sequences=false")


def to_model_batch(batch: dict) -> dict:
    """collate_sft / packed rows -> the keys lm_forward_step reads."""
    out = {"tokens": batch["input_ids"], "labels": batch["labels"], "loss_mask": batch["loss_mask"],
           "position_ids": batch["position_ids"], "attention_mask": None}
    if "document_ids" in batch:
        # packed rows: attention stays inside each document (RoPE is relative, so a document's
        # scores do not depend on where it sits in the row)
        out["attention_mask"] = packed_attention_mask(batch["document_ids"])
    return out


def context_parallel_slice(batch: dict) -> dict:
    """With context parallelism each CP rank keeps 2 of the sequence's 2*cp chunks (megatron's
    load-balanced split for causal attention); a no-op at cp=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(batch)


def collate(samples: list[dict], pad_id: int, length: int) -> dict:
    """Samples (or packed rows) -> one model microbatch of `length` tokens per row (this CP rank's
    part of them under context parallelism)."""
    if "document_ids" in samples[0]:
        keys = ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")
        return context_parallel_slice(to_model_batch({k: torch.stack([s[k] for s in samples]) for k in keys}))
    return context_parallel_slice(to_model_batch(collate_sft(samples, pad_id, seq_length=length)))


@dataclass
class StepBatch:
    microbatches: list[dict]
    seq_length: int          # padded length of every microbatch in this step
    num_sequences: int       # sequences on this rank


@dataclass
class MicrobatchStream:
    """This DP rank's microbatches, one optimizer step at a time, with a resumable position."""

    dataset: Any
    pad_id: int
    micro_batch_size: int
    num_microbatches: int
    max_seq_length: int
    multiple: int
    dp_rank: int
    dp_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        self.sampler = ResumableShardedSampler(len(self.dataset), seed=self.seed, shuffle=self.shuffle,
                                               dp_rank=self.dp_rank, dp_size=self.dp_size, drop_last=True)
        self._indices = None

    def _next_index(self) -> int:
        for _ in range(2):  # at most one epoch boundary per index
            if self._indices is None:
                self._indices = iter(self.sampler)
            try:
                return next(self._indices)
            except StopIteration:
                self._indices = None
        raise RuntimeError("the training set is smaller than the data-parallel size")

    def _padded_length(self, samples: list[dict]) -> int:
        if "document_ids" in samples[0]:
            return self.max_seq_length  # packed rows are full length already
        longest = max(len(s["input_ids"]) for s in samples)
        return min(self.max_seq_length, math.ceil(longest / self.multiple) * self.multiple)

    def next_step(self) -> StepBatch:
        count = self.micro_batch_size * self.num_microbatches
        samples = [self.dataset[self._next_index()] for _ in range(count)]
        length = self._padded_length(samples)
        microbatches = []
        for i in range(0, count, self.micro_batch_size):
            microbatches.append(collate(samples[i:i + self.micro_batch_size], self.pad_id, length))
        return StepBatch(microbatches, length, count)

    def state_dict(self) -> dict:
        # The sampler's offset counts global samples, and every rank consumed whole steps, so this is
        # the same on every rank. A fresh iterator resumes from it.
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._indices = None


def eval_microbatches(dataset, pad_id: int, micro_batch_size: int, max_seq_length: int,
                      multiple: int, dp_rank: int, dp_size: int, limit: int | None = None) -> tuple[list, int]:
    """This DP rank's share of the held-out set as equal-length microbatches (for eval_step).
    Every rank gets the same number of microbatches (the set is cut to a multiple of dp*mbs)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    n -= n % (dp_size * micro_batch_size)
    mine = [dataset[i] for i in range(dp_rank, n, dp_size)]
    if not mine:
        return [], max_seq_length
    longest = max(len(s["input_ids"]) for s in mine)
    length = min(max_seq_length, math.ceil(longest / multiple) * multiple)
    batches = []
    for i in range(0, len(mine), micro_batch_size):
        batches.append(collate(mine[i:i + micro_batch_size], pad_id, length))
    return batches, length
