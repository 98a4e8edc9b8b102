"""GSPO on 1 and 2 ranks over gloo, two process launches in all.

Update invariance: one GSPO update (old log-probs, then ppo_epochs x mini_batches optimizer steps)
on a fixed rollout batch must give the same parameters under TP1 (one process, one microbatch per
mini-batch) and TP2, TP2+SP, DP2 with the distributed optimizer and PP2 (1F1B), each cut into
microbatches of 3 rows (so filler rows and, under DP2 with group filtering, a rank with nothing but
filler appear). The packed path (megagsm.rl.packing: THD microbatches of at most PACK_BUDGET tokens,
sequences balanced over DP ranks by tokens) must give the same update as that padded reference, in
one process and at TP2, TP2+SP, DP2, PP2 and (a tiny MoE, against its own padded reference) EP2.
fp32; tolerance as in the parity harness: Adam eps 1e-4 keeps updates a smooth
function of the gradient, so 2e-6 on parameters after lr-1e-3 steps is ~500x below one step.

End to end: `run_gspo` with in-process generation on a tiny random model (DP2 and TP2), with a toy
reward a random policy earns about half the time (its completion holds a digit), so groups are mixed and
updates happen. Resume: a run stopped after step 2 and resumed with resume=auto repeats the
uninterrupted run's step 3 exactly (prompts and sampling seeds are functions of the step; weights,
Adam state, LR schedule and RNG come from the checkpoint).
"""
import math
import os
from typing import NamedTuple

import pytest
import torch

from megagsm.rewards import register_reward
from megagsm.testing.multirank import run_ranks

pytestmark = pytest.mark.multirank

PARAM_ATOL = 2e-6
TOY_REWARD = "test_has_digit"


@register_reward(TOY_REWARD)
def has_digit(solution_str, ground_truth, **kwargs):
    """A random policy over this tokenizer (digits are single tokens) earns it about half the time."""
    return 1.0 if any(c.isdigit() for c in solution_str) else 0.0


# ---------------------------------------------------------------- fixed rollout batch, any layout

def _spec(moe: bool = False):
    from megagsm.testing.parity import TinyGPTSpec

    # MoE: dropless top-2 of 4 experts, no aux loss (padding tokens route too, so an aux loss
    # would differ between padded and packed microbatches by design)
    experts = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32) if moe else {}
    return TinyGPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=128, seq_length=32, **experts)


class Run(NamedTuple):
    """One layout of the update-invariance launches: how its microbatches are built."""
    parallel: object            # ParallelConfig
    budget: int = 0             # train.max_tokens_per_microbatch (0: padded rows of MICRO_BATCH)
    moe: bool = False
    cases: tuple | None = None  # None: every case
    share: bool = False         # train.share_prompts: a group's prompt laid out once per microbatch


MICRO_BATCH = 3       # padded rows per microbatch at 2 ranks (filler rows appear)
PACK_BUDGET = 32      # tokens per packed microbatch: the longest sequence (21 tokens) fits; several microbatches
# packed at 2 ranks: a sequence count (2 mini-batches x 2 epochs, filtered groups: a DP rank that
# placement leaves empty) and a token count; every case runs packed in one process
PACKED_CASES = ("gspo", "grpo_token_mean")
MOE_CASES = ("gspo", "grpo_token_mean")


class Case(NamedTuple):
    mode: str                   # loss mode
    agg: str                    # loss aggregation
    filter_zero_std: bool
    prompts: int
    n: int                      # rollouts per prompt
    mini_batches: int
    epochs: int
    clip: tuple[float, float]   # (low, high)
    temperature: float
    vocab_limit: int | None
    skip_old_pass: bool = False  # on-policy: the update's own log-probs serve as the old ones


CASES = {
    "gspo": Case("gspo", "seq-mean-token-mean", True, 8, 4, 2, 2, (3e-4, 4e-4), 1.0, None),
    "gspo_wide_clip": Case("gspo", "seq-mean-token-mean", False, 8, 4, 2, 1, (0.02, 0.03), 0.7, 100),
    "grpo_token_mean": Case("grpo", "token-mean", True, 4, 4, 1, 2, (0.2, 0.28), 1.0, None),
    "gspo_token_norm": Case("gspo_token", "seq-mean-token-sum-norm", False, 4, 4, 2, 1, (0.01, 0.01), 1.0, 100),
    "on_policy": Case("gspo", "seq-mean-token-mean", False, 4, 4, 1, 1, (3e-4, 4e-4), 1.0, None),
    "on_policy_skip": Case("gspo", "seq-mean-token-mean", False, 4, 4, 1, 1, (3e-4, 4e-4), 1.0, None, True),
}


def _fixed_rollouts(case, dp_rank, dp_size):
    """The same global batch on every rank; this rank keeps its share (megagsm.rl.rollout placement)."""
    from megagsm.rl.batching import Rollouts
    from megagsm.rl.rollout import rank_share

    P, n, M = case.prompts, case.n, case.mini_batches
    top = case.vocab_limit or 128
    g = torch.Generator().manual_seed(11)
    prompts, responses, rewards = [], [], []
    for p in range(P):
        prompts.append(torch.randint(1, top, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist())
        responses.append([torch.randint(1, top, (int(torch.randint(1, 13, (1,), generator=g)),),
                                        generator=g).tolist() for _ in range(n)])
        r = torch.randint(0, 2, (n,), generator=g).float()
        r[0], r[1] = 0.0, 1.0
        if p in (0, 1):  # under DP2 with 2 mini-batches, rank 0's first share is all flat groups
            r[:] = float(p)
        rewards.append(r)
    share = rank_share(P, M, dp_size, dp_rank)
    return Rollouts(prompts=[prompts[p] for _, p in share for _ in range(n)],
                    responses=[resp for _, p in share for resp in responses[p]],
                    rewards=torch.cat([rewards[p] for _, p in share]),
                    mini_batch=[k for k, _ in share for _ in range(n)], group_size=n)


def _update_all(runs: dict, micro_batch_size: int, init_state):
    from megatron.core.optimizer import OptimizerConfig

    from megagsm.models.training import build_optimizer, wrap_ddp
    from megagsm.rl.batching import build_minibatches, compute_advantages
    from megagsm.models.training import sequence_length_multiple
    from megagsm.rl.gspo import UPDATE_METRICS, padded_token_fraction
    from megagsm.rl.packing import build_packed_minibatches
    from megagsm.rl.update import LogProbs, LossSpec, MetricSums, compute_log_probs, update_policy, with_log_probs
    from megagsm.runtime import init_runtime
    from megagsm.runtime.collectives import dp_group, gather_objects
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.testing.parity import tiny_gpt_model

    out = {}
    for lname, run in runs.items():
        parallel = run.parallel
        for cname, case in CASES.items():
            if run.cases is not None and cname not in run.cases:
                continue
            info = init_runtime(parallel, seed=5)
            chunks = tiny_gpt_model(_spec(run.moe), parallel)
            init = None
            if init_state is None:
                init = gather_full_state_dict(chunks)
            else:
                load_full_state_dict(chunks, init_state[(run.moe, cname)])
            chunks = wrap_ddp(chunks, parallel)
            optimizer = build_optimizer(chunks, OptimizerConfig(
                optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=1.0, adam_eps=1e-4,
                use_distributed_optimizer=parallel.use_distributed_optimizer))
            rollouts = _fixed_rollouts(case, info.dp_rank, info.dp_size)
            advantages = compute_advantages(rollouts, filter_zero_std_groups=case.filter_zero_std)
            if run.budget:
                minibatches = build_packed_minibatches(rollouts, advantages, case.mini_batches, run.budget,
                                                       sequence_length_multiple(parallel), share_prompts=run.share)
            else:
                minibatches = build_minibatches(rollouts, advantages, case.mini_batches, micro_batch_size,
                                                sequence_length_multiple(parallel))
            spec = LossSpec(mode=case.mode, clip_ratio_low=case.clip[0], clip_ratio_high=case.clip[1],
                            loss_agg_mode=case.agg, temperature=case.temperature, vocab_limit=case.vocab_limit,
                            norm=12.0, on_policy=case.skip_old_pass)
            # (the sampler's log-probs are unknown here: build_minibatches leaves them zero)
            if case.skip_old_pass:
                old = LogProbs([], MetricSums())
            else:
                old = compute_log_probs(chunks, minibatches, spec, with_metrics=True)
                minibatches = with_log_probs(minibatches, old, "old_log_prob")
            result = update_policy(chunks, optimizer, minibatches, spec, case.epochs)
            out[(lname, cname)] = {
                "init": init, "final": gather_full_state_dict(chunks, dst=0), "losses": result.losses,
                "grad_norms": result.grad_norms, "updates": result.updates, "skipped": result.skipped,
                "metrics": old.metrics.merged(result.metrics).reduce(UPDATE_METRICS),
                "microbatches": [len(mb.microbatches) for mb in minibatches],
                "local": [mb.local_sequences for mb in minibatches],
                "rank_tokens": gather_objects([mb.real_tokens for mb in minibatches], dp_group()),
                "padded_token_fraction": padded_token_fraction(minibatches)}
    return out


def _check_log_probs_against_full_softmax(parallel):
    """token_log_probs / token_entropy on vocab-sharded logits = log_softmax over gathered logits."""
    from megagsm.rl.logprobs import token_entropy, token_log_probs
    from megagsm.runtime import init_runtime
    from megagsm.testing.parity import tiny_gpt_model

    init_runtime(parallel, seed=5)
    model = tiny_gpt_model(_spec(), parallel)[0]
    tokens = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        sharded = model(tokens, pos, None)
        full = model(tokens, pos, None, runtime_gather_output=True)
    labels = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for temperature, limit in ((1.0, None), (0.7, 100)):
        z = full.float() / temperature
        if limit is not None:
            z[..., limit:] = float("-inf")
        ref = torch.log_softmax(z, -1)
        lp = token_log_probs(sharded, labels, temperature, limit)
        ent = token_entropy(sharded, temperature, limit)
        p = ref.exp()
        ref_ent = -(p * torch.where(p > 0, ref, torch.zeros_like(ref))).sum(-1)
        worst = max(worst, (lp - ref.gather(-1, labels[..., None])[..., 0]).abs().max().item(),
                    (ent - ref_ent).abs().max().item())
    return worst


def _layout_launch(init_state, layouts):
    out = {"update": _update_all(layouts, MICRO_BATCH, init_state)}
    out["logprob_err_tp2"] = _check_log_probs_against_full_softmax(layouts["tp2"].parallel)
    return out


# ---------------------------------------------------------------- run_gspo end to end

def _config(inputs, out_dir, overrides):
    from megagsm.testing.tiny_runs import tiny_run_config

    return tiny_run_config(inputs, out_dir, [
        "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.clip_grad=1.0", "optim.adam_eps=1e-6",
        "train.micro_batch_size=4", "train.train_steps=3", "algorithm.gspo.mini_batches=2",
        "algorithm.gspo.clip_ratio_low=0.2", "algorithm.gspo.clip_ratio_high=0.28",
        f"algorithm.gspo.reward={TOY_REWARD}", *overrides])


def _e2e_launch(inputs, root):
    from megagsm.rl import run_gspo
    from megagsm.rl.gspo import GSPO
    from megagsm.runtime.sharded import gather_full_state_dict
    from megagsm.train import Trainer
    from megagsm.utils.metrics import read_metrics

    out = {}
    tp2 = run_gspo(_config(inputs, os.path.join(root, "tp2"), [
        "parallel.tp=2", "parallel.sequence_parallel=true", "train.eval_at_start=true",
        "train.eval_accuracy=true", "train.eval_max_examples=6", "train.train_steps=2"]))
    out["tp2"] = {"history": tp2.history, "checkpoint": tp2.checkpoint,
                  "rows": read_metrics(os.path.join(root, "tp2", "metrics.jsonl")),
                  "png": os.path.exists(os.path.join(root, "tp2", "gspo_metrics.png"))}
    dp = ["parallel.use_distributed_optimizer=true", "train.save_interval=1", "algorithm.gspo.kl_coef=0.05"]
    full = Trainer(_config(inputs, os.path.join(root, "full"), dp), GSPO)
    out["full"] = {"history": full.fit().history, "params": gather_full_state_dict(full.chunks, dst=0)}
    run_gspo(_config(inputs, os.path.join(root, "resumed"), dp + ["train.train_steps=2"]))
    resumed = Trainer(_config(inputs, os.path.join(root, "resumed"), dp + ["train.resume=auto"]), GSPO)
    result = resumed.fit()
    out["resumed"] = {"history": result.history, "from": result.resumed_from,
                      "params": gather_full_state_dict(resumed.chunks, dst=0)}
    # from HF weights (model.init=hf: converted once under the run's output dir), exported back to HF
    from_hf = run_gspo(_config(inputs, os.path.join(root, "from_hf"), [
        "model.init=hf", f"model.hf_dir={inputs['hf_init']}", "train.train_steps=1", "train.export_hf=true"]))
    out["from_hf"] = {"export": from_hf.hf_export, "history": from_hf.history, "checkpoint": from_hf.checkpoint}
    # verl's RL parquet layout with no data option besides the path (chat prompts, reward_model ground truth)
    verl = run_gspo(_config(inputs, os.path.join(root, "verl"), [
        "data.source=parquet", f"data.train_path={inputs['verl']}/train.parquet", "data.eval_path=null",
        "train.train_steps=1"]))
    out["verl"] = {"history": verl.history}
    return out


def _pair_launch(init_state, layouts, inputs, root):
    out = _layout_launch(init_state, layouts)
    out["e2e"] = _e2e_launch(inputs, root)
    return out


# ---------------------------------------------------------------- fixtures and tests

@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    from megagsm.config.parallel import ParallelConfig
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs
    from megagsm.testing.tiny_runs import hf_model_dir

    # the references: one process, padded rows, one microbatch per mini-batch (dense and MoE);
    # tp1_packed: one process, several packed microbatches per mini-batch
    single = run_ranks(_update_all, 1, {"tp1": Run(ParallelConfig()),
                                        "tp1_moe": Run(ParallelConfig(), moe=True, cases=MOE_CASES),
                                        "tp1_packed": Run(ParallelConfig(), PACK_BUDGET),
                                        "tp1_shared": Run(ParallelConfig(), PACK_BUDGET, share=True)}, 16, None)[0]
    init_state = {(False, c): single[("tp1", c)]["init"] for c in CASES}
    init_state.update({(True, c): single[("tp1_moe", c)]["init"] for c in MOE_CASES})
    tp2, sp = ParallelConfig(tp=2, use_distributed_optimizer=False), ParallelConfig(
        tp=2, sequence_parallel=True, use_distributed_optimizer=False)
    dp2, pp2 = ParallelConfig(use_distributed_optimizer=True), ParallelConfig(pp=2, use_distributed_optimizer=False)
    layouts = {
        "tp2": Run(tp2), "tp2_sp": Run(sp), "dp2_distopt": Run(dp2), "pp2": Run(pp2),
        **{f"{name}_packed": Run(parallel, PACK_BUDGET, cases=PACKED_CASES)
           for name, parallel in (("tp2", tp2), ("tp2_sp", sp), ("dp2_distopt", dp2), ("pp2", pp2))},
        "ep2_packed": Run(ParallelConfig(ep=2, use_distributed_optimizer=False), PACK_BUDGET, moe=True,
                          cases=MOE_CASES),
        # shared prompts: every token-wise layout, and EP's token exchange
        **{f"{name}_shared": Run(parallel, PACK_BUDGET, cases=PACKED_CASES, share=True)
           for name, parallel in (("tp2_sp", sp), ("dp2_distopt", dp2), ("pp2", pp2))},
        "ep2_shared": Run(ParallelConfig(ep=2, use_distributed_optimizer=False), PACK_BUDGET, moe=True,
                          cases=MOE_CASES, share=True),
    }
    root = tmp_path_factory.mktemp("gspo")
    inputs = prepare_inputs(root / "inputs", DemoSpec(n_train=64, n_test=8, model=TINY_MODEL))
    inputs["hf_init"] = hf_model_dir(inputs["base"], root / "hf_init")
    from megagsm.data.prepare import prepare_gsm8k

    inputs["verl"] = str(root / "verl")
    prepare_gsm8k(str(root / "inputs" / "data"), inputs["verl"])

    pair = run_ranks(_pair_launch, 2, init_state, layouts, inputs, str(root))
    return single, pair[0], layouts


def _compared(single, pair, layouts):
    """(layout, case, reference result, result) for every run but the references themselves: the
    2-rank layouts and the one-process packed run, each against the one-process padded run."""
    runs = {"tp1_packed": (single, None), "tp1_shared": (single, None),
            **{name: (pair["update"], run) for name, run in layouts.items()}}
    for lname, (results, run) in runs.items():
        moe = run is not None and run.moe
        for cname in (run.cases if run is not None and run.cases else CASES):
            yield lname, cname, single[("tp1_moe" if moe else "tp1", cname)], results[(lname, cname)]


def test_update_is_layout_invariant(launches):
    single, pair, layouts = launches
    from megagsm.testing.parity import max_param_diff

    for ref in [single[("tp1", c)] for c in CASES] + [single[("tp1_moe", c)] for c in MOE_CASES]:
        assert ref["updates"] >= 1 and all(math.isfinite(x) for x in ref["losses"])
        moved = max(max_param_diff(ref["init"], ref["final"])[0], 0.0)
        assert moved > 100 * PARAM_ATOL, moved  # the update did something the tolerance can see
    compared = 0
    for lname, cname, ref, got in _compared(single, pair, layouts):
        diff, key = max_param_diff(ref["final"], got["final"])
        assert diff < PARAM_ATOL, (cname, lname, key, diff)
        # GSPO losses are sums of +-advantages that nearly cancel: compare on the scale of the terms
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), (cname, lname)
        assert got["updates"] == ref["updates"] and got["skipped"] == ref["skipped"]
        assert set(got["metrics"]) == set(ref["metrics"]), (cname, lname)
        for name, value in ref["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (cname, lname, name)
        compared += 1
    assert compared == len(CASES) * 6 + len(PACKED_CASES) * 7 + len(MOE_CASES) * 2


def test_microbatch_split_and_filler_rows(launches):
    single, pair, _ = launches
    assert single[("tp1", "gspo")]["microbatches"] == [1, 1]
    assert single[("tp1", "gspo")]["local"] == [8, 16]  # two flat groups filtered out of mini-batch 0
    # DP2, 3 rows per microbatch: rank 0's first mini-batch holds only the two flat groups, which the
    # filter drops; it still runs as many (filler) microbatches as rank 1 needs for its 8 sequences
    dp2 = pair["update"][("dp2_distopt", "gspo")]
    assert dp2["local"] == [0, 8] and dp2["microbatches"] == [3, 3]


def test_packed_microbatches_balance_tokens_and_cut_padding(launches):
    """Packed, DP2: the sequences of mini-batch 0 (all on rank 1 by placement) are re-placed by tokens
    (rank 0 trains about half of them), both ranks run the same number of microbatches, and the
    padded share of the computed tokens falls well below the padded rows'."""
    single, pair, _ = launches
    padded, packed = pair["update"][("dp2_distopt", "gspo")], pair["update"][("dp2_distopt_packed", "gspo")]
    assert padded["rank_tokens"][0][0] == 0 and packed["local"][0] > 0  # rank 0 gets a share of mini-batch 0
    per_mb = list(zip(*packed["rank_tokens"]))
    assert [sum(t) for t in per_mb] == [sum(t) for t in zip(*padded["rank_tokens"])]  # the same sequences
    for rank0, rank1 in per_mb:
        assert abs(rank0 - rank1) <= 21  # within one (the longest) sequence of an even split
    assert packed["padded_token_fraction"] < padded["padded_token_fraction"] - 0.2
    assert single[("tp1_packed", "gspo")]["microbatches"][1] > 1  # several packed microbatches


def test_first_update_is_on_policy_and_clipping_is_exercised(launches):
    single, _, _ = launches
    on_policy = single[("tp1", "on_policy")]["metrics"]
    # old log-probs are recomputed on the update's own microbatches: the one update sees ratio 1
    assert on_policy["seq_ratio_mean"] == 1.0 and on_policy["pg_clipfrac"] == 0.0
    assert on_policy["approx_kl_k3"] == 0.0
    clipfrac = single[("tp1", "gspo")]["metrics"]["pg_clipfrac"]
    assert 0.0 < clipfrac < 1.0  # later mini-batches/epochs move past 3e-4 for some sequences only


def test_on_policy_update_without_the_old_log_prob_pass_is_the_same_update(launches):
    """One mini-batch, one epoch: skipping the forward-only pass (old = the update's own log-probs,
    detached) gives the parameters and metrics of the two-pass update, at every layout."""
    single, pair, layouts = launches
    from megagsm.testing.parity import max_param_diff

    names = [n for n, run in layouts.items() if run.cases is None]
    for results, names in ((single, ["tp1", "tp1_packed"]), (pair["update"], names)):
        for lname in names:
            two_pass, skipped = results[(lname, "on_policy")], results[(lname, "on_policy_skip")]
            assert max_param_diff(two_pass["final"], skipped["final"])[0] < 1e-7, lname
            assert skipped["losses"] == pytest.approx(two_pass["losses"], rel=1e-6, abs=1e-9)
            for name, value in two_pass["metrics"].items():
                assert skipped["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (lname, name)


def test_log_probs_match_a_full_vocab_softmax_under_tp2(launches):
    _, pair, _ = launches
    assert pair["logprob_err_tp2"] < 1e-5


def test_run_gspo_end_to_end(launches):
    _, pair, _ = launches
    tp2 = pair["e2e"]["tp2"]
    assert tp2["checkpoint"].endswith("iter_0000002") and tp2["png"]
    rows = [r for r in tp2["rows"] if r["phase"] == "gspo"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "accuracy" in rows[0] and "accuracy" in rows[-1]
    for row in rows[1:]:
        for key in ("reward_mean", "reward_std", "rollout_accuracy", "response_length", "pg_clipfrac",
                    "approx_kl_k3", "entropy", "time_generate", "time_score", "time_logprob", "time_update",
                    "tokens_per_s", "gen_tokens_per_s", "zero_std_groups", "loss", "grad_norm",
                    "padded_token_fraction"):
            assert key in row and math.isfinite(row[key]), key
        assert row["updates"] >= 1  # the toy reward gives mixed groups
        # the sampler's log-probs and the recomputed ones agree to float rounding
        assert row["logprob_diff_gen"] < 1e-4
    full = pair["e2e"]["full"]["history"]
    assert all(full[s]["kl_loss"] >= 0 for s in (1, 2, 3)) and full[3]["kl_loss"] > 0  # kl_coef > 0 run


def test_gspo_starts_from_hf_weights_and_exports_hf(launches):
    """model.init=hf -> one GSPO step -> train.export_hf: the export is an HF model transformers loads,
    holding the HF weights moved by the update (and nothing else changed in shape)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, pair, _ = launches
    run = pair["e2e"]["from_hf"]
    assert run["checkpoint"].endswith("iter_0000001") and run["history"][1]["updates"] >= 1
    exported = AutoModelForCausalLM.from_pretrained(run["export"]).state_dict()
    hf_init = os.path.join(os.path.dirname(os.path.dirname(run["export"])), "hf_init")
    initial = load_file(os.path.join(hf_init, "model.safetensors"))
    assert set(initial) <= set(exported)
    moved = max((exported[k].float() - v.float()).abs().max().item() for k, v in initial.items())
    assert all(exported[k].shape == v.shape for k, v in initial.items())
    assert 0 < moved < 0.1, moved  # started from these weights, then one lr-1e-3 update


def test_gspo_trains_on_verl_parquet_with_only_the_path(launches):
    _, pair, _ = launches
    row = pair["e2e"]["verl"]["history"][1]
    for key in ("reward_mean", "response_length", "entropy", "time_generate"):
        assert math.isfinite(row[key]), key
    assert row["sequence_tokens"] > row["response_tokens"] > 0


def test_resume_repeats_the_uninterrupted_run(launches):
    _, pair, _ = launches
    full, resumed = pair["e2e"]["full"], pair["e2e"]["resumed"]
    assert resumed["from"].endswith("iter_0000002")
    assert sorted(resumed["history"]) == [3]
    a, b = full["history"][3], resumed["history"][3]
    for key in ("reward_mean", "loss", "grad_norm", "entropy", "approx_kl_k3", "kl_loss", "response_length"):
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key
    from megagsm.testing.parity import max_param_diff

    assert max_param_diff(full["params"], resumed["params"])[0] == 0.0


# ---------------------------------------------------------------- learning signal (slow)

def _learning_launch(inputs, root):
    from megagsm.rl import run_gspo

    run = run_gspo(_config(inputs, os.path.join(root, "learn"), [
        "train.train_steps=20", "train.micro_batch_size=16", "optim.lr=5e-3", "optim.adam_eps=1e-8",
        "algorithm.gspo.prompts_per_step=8", "algorithm.gspo.n_rollouts=8", "algorithm.gspo.mini_batches=2",
        "algorithm.gspo.clip_ratio_low=3e-4", "algorithm.gspo.clip_ratio_high=4e-4"]))
    return {s: row["reward_mean"] for s, row in run.history.items() if "reward_mean" in row}


@pytest.mark.slow
def test_mean_reward_rises_on_an_easy_task(tmp_path):
    """A random tiny policy mentions a digit in about half of its 8-token completions; GSPO (paper clip
    range, 2 mini-batches per step) must make that the rule within 20 steps."""
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs

    inputs = prepare_inputs(tmp_path / "inputs", DemoSpec(n_train=64, n_test=8, model=TINY_MODEL))
    rewards = run_ranks(_learning_launch, 2, inputs, str(tmp_path))[0]
    first = sum(rewards[s] for s in (1, 2, 3)) / 3
    last = sum(rewards[s] for s in (18, 19, 20)) / 3
    assert last > first + 0.25 and last > 0.85, rewards
