"""SFT data for the trainer: tokenised samples (padded or packed) and a resumable stream of per-step microbatches for this data-parallel rank.

Each optimizer step takes `global_batch_size` sequences (packed rows with `data.pack_sequences`):
this DP rank's share, cut into `num_microbatches` microbatches of `micro_batch_size` (gradient
accumulation). All microbatches of a step have one shape, since pipeline stages exchange activations
of a fixed shape within a step: padded rows are padded to the step's longest sample (rounded up to a
multiple of 8 and of what sequence/context parallelism need, at most `data.seq_length`); packed rows
(`data.seq_length` each) are joined into one THD sequence of `micro_batch_size * seq_length` tokens
(`packed_microbatch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from megagsm.config.data import DataConfig
from megagsm.data.gsm8k import GSM8KExample
from megagsm.data.packing import PackedDataset
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import SFTDataset, collate_sft
from megagsm.models.packed_seq import thd_params


def build_dataset(examples: list[GSM8KExample], tokenizer, data: DataConfig, name: str):
    samples = SFTDataset(examples, tokenizer, data.seq_length, template=data.prompt_template,
                         truncation=data.truncation, source_name=name)
    if data.pack_sequences:
        return PackedDataset(samples, data.seq_length, samples.pad_id)
    return samples


def to_model_batch(batch: dict) -> dict:
    """collate_sft's padded rows -> the keys lm_forward_step reads."""
    return {"tokens": batch["input_ids"], "labels": batch["labels"], "loss_mask": batch["loss_mask"],
            "position_ids": batch["position_ids"], "attention_mask": None}


def packed_microbatch(rows: list[dict]) -> dict:
    """Packed rows (megagsm.data.packing) -> one THD microbatch: the rows joined into a [1, rows * S]
    sequence whose documents are each row's samples and its padding tail (a document of its own: THD
    documents cover every token), with positions restarting per document. Attention stays inside each
    document through `packed_seq_params` under any core attention (megagsm's SDPA, transformer-engine),
    and RoPE restarts per document; no [S, S] mask exists. The loss reads the same tokens, labels and
    loss mask as the rows, flattened."""
    seq = rows[0]["input_ids"].shape[0]
    lengths = []
    for row in rows:
        bounds = row["cu_seqlens"].tolist()
        lengths += [b - a for a, b in zip(bounds, bounds[1:])]
        if bounds[-1] < seq:
            lengths.append(seq - bounds[-1])
    joined = {k: torch.cat([row[k] for row in rows]).unsqueeze(0)
              for k in ("input_ids", "labels", "loss_mask", "position_ids")}
    return {"tokens": joined["input_ids"], "labels": joined["labels"], "loss_mask": joined["loss_mask"],
            "position_ids": joined["position_ids"], "attention_mask": None,
            "packed_seq_params": thd_params(lengths)}


def context_parallel_slice(batch: dict) -> dict:
    """With context parallelism each CP rank keeps 2 of the sequence's 2*cp chunks (megatron's
    load-balanced split for causal attention); a no-op at cp=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    if not ps.model_parallel_is_initialized() or ps.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(batch)


def collate(samples: list[dict], pad_id: int, length: int) -> dict:
    """Samples -> one model microbatch of `length` tokens per row (this CP rank's part of them under
    context parallelism); packed rows -> one THD microbatch (packed_microbatch)."""
    if "cu_seqlens" in samples[0]:
        return packed_microbatch(samples)  # data.pack_sequences needs cp=1 (config validation)
    return context_parallel_slice(to_model_batch(collate_sft(samples, pad_id, seq_length=length)))


@dataclass
class StepBatch:
    microbatches: list[dict]
    seq_length: int          # tokens per row of every microbatch, over all CP ranks (packed: rows * S)
    num_sequences: int       # sequences (packed: rows) on this rank

    @property
    def micro_batch_size(self) -> int:
        """Rows per microbatch as megatron's schedule sees them (packed: 1 THD sequence)."""
        return self.microbatches[0]["tokens"].shape[0] if self.microbatches else 0


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

    def next_step(self) -> StepBatch:
        count = self.micro_batch_size * self.num_microbatches
        samples = [self.dataset[self._next_index()] for _ in range(count)]
        return step_batch(samples, self.pad_id, self.micro_batch_size, self.max_seq_length, self.multiple)

    def state_dict(self) -> dict:
        # The sampler's offset counts global samples, and every rank consumed whole steps, so this is
        # the same on every rank. A fresh iterator resumes from it.
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._indices = None


def step_batch(samples: list[dict], pad_id: int, micro_batch_size: int, max_seq_length: int,
               multiple: int) -> StepBatch:
    """Samples -> microbatches of micro_batch_size samples, all of one shape (module docstring)."""
    longest = max(len(s["input_ids"]) for s in samples)
    length = min(max_seq_length, math.ceil(longest / multiple) * multiple)
    microbatches = [collate(samples[i:i + micro_batch_size], pad_id, length)
                    for i in range(0, len(samples), micro_batch_size)]
    if "cu_seqlens" in samples[0]:
        length = micro_batch_size * len(samples[0]["input_ids"])  # one THD sequence of the rows
    return StepBatch(microbatches, length, len(samples))


def eval_microbatches(dataset, pad_id: int, micro_batch_size: int, max_seq_length: int,
                      multiple: int, dp_rank: int, dp_size: int, limit: int | None = None) -> StepBatch:
    """This DP rank's share of the held-out set as equal-shape microbatches (for eval_step).
    Every rank gets the same number of microbatches (the set is cut to a multiple of dp*mbs)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    n -= n % (dp_size * micro_batch_size)
    mine = [dataset[i] for i in range(dp_rank, n, dp_size)]
    if not mine:
        return StepBatch([], max_seq_length, 0)
    return step_batch(mine, pad_id, micro_batch_size, max_seq_length, multiple)
