"""Layout parity: TP2, TP2+SP, PP2 (1F1B, 4 microbatches), DP2 with the
distributed optimizer and EP2 (MoE, alltoall) against one process, all over gloo on CPU.

Tolerances (fp32): every layout computes the same sums in a different order (TP splits the hidden
reductions and all-reduces partial sums; DP/EP sum gradients across ranks; PP does not reorder). With
fp32 unit roundoff 6e-8 and reductions over <= 128 terms, each op carries relative error ~1e-6, so the
token-mean losses must agree to rtol 1e-6. Parameters after 3 Adam steps (lr 1e-2, eps 1e-4: the update
is smooth in the gradient, gain <= lr/eps = 100 on the smallest entries) measured <= 2e-6 apart;
atol 1e-5 leaves 5x margin and is still 1000x below one optimizer step (1e-2), so a layout that
mis-sums or mis-scales any gradient (e.g. averaging over DP twice, the bug this caught once) fails.
"""
import math

import pytest

from megagsm.testing.parity import LAYOUTS, TinyGPTSpec, max_param_diff, run_parity

pytestmark = pytest.mark.multirank

LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-5


def _check(reference, results):
    assert all(math.isfinite(x) for x in reference["losses"])
    # training must actually move: otherwise equal parameters prove nothing
    moved = max_param_diff(reference["init"], reference["final"])[0]
    assert moved > 1e-3, moved
    for name, result in results.items():
        for step, (ref, got) in enumerate(zip(reference["losses"], result["losses"])):
            assert got == pytest.approx(ref, rel=LOSS_RTOL), f"{name} step {step}: {got} vs {ref}"
        diff, key = max_param_diff(reference["final"], result["final"])
        assert diff < PARAM_ATOL, f"{name}: {key} differs by {diff:.3g}"


def test_dense_layouts_match_single_process():
    layouts = {k: LAYOUTS[k] for k in ("tp2", "tp2_sp", "pp2", "dp2_distopt")}
    reference, results = run_parity(TinyGPTSpec(), layouts)
    assert set(results) == set(layouts)
    _check(reference, results)


def test_expert_parallel_matches_single_process():
    reference, results = run_parity(TinyGPTSpec(num_moe_experts=4), {"ep2": LAYOUTS["ep2"]})
    _check(reference, results)
