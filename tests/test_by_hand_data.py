"""Edges of the data pipeline checked by hand or by counting (a larger `make mutate` sample found them
unchecked): bins and packed rows filled exactly to capacity, an empty packed row, the packed attention
mask of a batch of rows, the shortest SFT sample, rows without a response, and the sampler's length
against what it yields."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from megagsm.data.packing import first_fit_bins, pack_group
from megagsm.testing.dense_document_mask import packed_attention_mask
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import make_sample


def test_bins_and_rows_filled_exactly_to_capacity():
    assert first_fit_bins([4, 2, 2], 4) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="sample 0 has 5 tokens, more than the bin capacity 4"):
        first_fit_bins([5], 4)
    a, b = make_sample([1, 2], [3]), make_sample([4], [5, 6])   # 2 + 2 = 4 tokens each
    row = pack_group([a, b], 4, pad_id=0)
    assert row["input_ids"].tolist() == [1, 2, 4, 5] and row["cu_seqlens"].tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="need 4 tokens, more than seq_length=3"):
        pack_group([a, b], 3, pad_id=0)


def test_an_empty_packed_row_is_all_padding():
    row = pack_group([], 3, pad_id=7)
    assert row["input_ids"].tolist() == [7, 7, 7] and row["loss_mask"].sum() == 0
    assert row["document_ids"].tolist() == [-1, -1, -1] and row["cu_seqlens"].tolist() == [0]
    assert row["max_seqlen"].item() == 0


def test_packed_attention_mask_of_a_batch_by_hand():
    docs = torch.tensor([[0, 0, 1], [0, -1, -1]])
    blocked = packed_attention_mask(docs)
    assert blocked.shape == (2, 1, 3, 3)
    allowed = [[[1, 0, 0], [1, 1, 0], [0, 0, 1]],    # two documents
               [[1, 0, 0], [0, 1, 0], [0, 1, 1]]]    # one document, then padding attending to padding
    assert (~blocked[:, 0]).int().tolist() == allowed
    assert torch.equal(packed_attention_mask(docs[1]), blocked[1:])  # one row: the same as in a batch


def test_the_shortest_sample_is_one_prompt_and_one_response_token():
    sample = make_sample([1], [2])
    assert sample["input_ids"].tolist() == [1] and sample["labels"].tolist() == [2]
    assert sample["loss_mask"].tolist() == [1.0]
    for prompt, response in (([], [2]), ([1], [])):
        with pytest.raises(ValueError, match="at least one prompt token and one response token"):
            make_sample(prompt, response)


@pytest.mark.parametrize("answer", [None, "", "  \n"])
def test_a_row_without_a_response_is_refused(answer):
    from megagsm.data.sft_dataset import SFTDataset
    from megagsm.errors import UserError

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    with pytest.raises(UserError, match="examples row 0: no response to train on"):
        SFTDataset([{"question": "q", "answer": answer}], tokenizer, 16)


def test_sampler_length_is_what_it_yields():
    """len(sampler) is the number of indices it yields from where it stands, for every layout and offset."""
    for n, dp_size, drop_last in itertools.product((1, 5, 6, 7), (1, 2, 3), (True, False)):
        if drop_last and n < dp_size:
            continue
        for dp_rank in range(dp_size):
            sampler = ResumableShardedSampler(n, seed=1, dp_rank=dp_rank, dp_size=dp_size, drop_last=drop_last)
            for offset in range(0, sampler.epoch_length + 1, dp_size):
                sampler.load_state_dict({"epoch": 0, "offset": offset})
                expected = len(sampler)
                assert expected == len(list(sampler)), (n, dp_size, drop_last, dp_rank, offset)
    with pytest.raises(ValueError, match="num_samples must be > 0, got 0"):
        ResumableShardedSampler(0)
    assert len(ResumableShardedSampler(1)) == 1


def test_set_epoch_starts_that_epoch_from_its_first_index():
    sampler = ResumableShardedSampler(6, seed=3)
    next(iter(sampler))                                # one index into epoch 0
    sampler.set_epoch(2)
    assert sampler.state_dict()["offset"] == 0
    assert list(sampler) == sampler.permutation(2).tolist()
