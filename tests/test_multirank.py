"""The multi-rank launcher reports every failing rank's traceback and returns results in rank order."""
import os

import pytest

from megagsm.testing.multirank import RankFailure, run_ranks


def _rank_value(fail_on: int):
    rank = int(os.environ["RANK"])
    if rank == fail_on:
        raise ValueError(f"boom on {rank}")
    return {"rank": rank, "world": int(os.environ["WORLD_SIZE"])}


def test_results_in_rank_order_and_failures_named():
    assert run_ranks(_rank_value, 2, -1) == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]
    with pytest.raises(RankFailure, match=r"(?s)rank 1:.*ValueError: boom on 1"):
        run_ranks(_rank_value, 2, 1)
