"""MoE routing replay (r2/r3) and rollout importance-sampling correction (TIS/MIS) for GSPO.

Unit tests (tensors, no process group): the TIS/MIS weights at token and sequence level against a
hand computation, and the routing layout helpers.

One 2-rank launch (tiny Qwen3-MoE, 8 experts top-2, EP=2, bf16 on CPU, from HF weights):
- routing drift: the rollouts of one step are scored by an old-log-prob pass that routes by itself
  (what r2's old pass does) and by one that replays the rollout's routing (r3). With r3 the experts
  megatron dispatches to (the router's own routing_map, read by a hook) are exactly the rollout's at
  every real token and layer; routing by itself they are not everywhere (bf16 drift), and replay
  lowers the sampler-vs-old log-prob difference;
- the token order: the same in fp32, where the sampler and the trainer agree to rounding, routing by
  itself picks the rollout's experts almost everywhere: a wrong rollout -> microbatch mapping would
  agree at chance level (~1/28 per top-2 set of 8);
- every family at its layouts (Qwen2-MoE at EP1 = DP2, DeepSeek-V3 at EP2, Qwen3-MoE and DeepSeek-V2
  at TP2 x EP2 with sequence parallelism, where each router sees half the sequence), fp32: r3
  dispatches exactly the rollout's experts, and routing by itself agrees with them;
- each of these in GSPO's default packed microbatches (THD, sequences re-placed over DP ranks by
  tokens, their routing travelling with them) and in padded rows;
- a 2-step GSPO run with routing_replay=r3 rollout_correction=tis logs router_match_rate 1.0 and
  rollout_is_weight_mean every step; a recompute=full run replays in the backward too (megatron's
  REPLAY_BACKWARD is used, and the run is the same).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from megagsm.rewards import register_reward
from megagsm.rl.rollout_correction import rollout_weights, sampler_kl
from megagsm.rl.routing_replay import filler_routing, real_positions
from megagsm.testing.multirank import run_ranks

TOY_REWARD = "test_routing_has_digit"
# below HF's default router scale (tiny_moe scales routers up 50x so that conversions never hinge on
# ties): near-tied expert scores are what bf16 drift flips, as in a real model's long tail of tokens
ROUTER_SCALE = 1.0 / 500.0
LAYERS = 4
TP2_EP2 = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "parallel.sequence_parallel=true"]
FAMILY_LAYOUTS = {"qwen2_moe": ["parallel.ep=1"], "deepseek_v3": [], "qwen3_moe_tp2_ep2": TP2_EP2,
                  "deepseek_v2": TP2_EP2}


@register_reward(TOY_REWARD)
def has_digit(solution_str, ground_truth, **kwargs):
    return 1.0 if any(c.isdigit() for c in solution_str) else 0.0


# ---------------------------------------------------------------- TIS / MIS by hand

OLD = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.2, -0.3, 0.0, 0.0]])
GEN = torch.tensor([[-1.5, -1.0, -2.0, 0.0], [-0.2, -1.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_token_level_tis_and_mis_weights_by_hand():
    # log-ratios old - gen: row 0: 0.5, -1.0, 1.5; row 1: 0.0, 0.7
    w = [[math.exp(0.5), math.exp(-1.0), math.exp(1.5)], [1.0, math.exp(0.7)]]   # 1.65, .37, 4.48; 1, 2.01
    tis, m = rollout_weights(OLD, GEN, MASK, "tis", "token", 2.0)
    expected = torch.tensor([[w[0][0], w[0][1], 2.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    torch.testing.assert_close(tis, expected)
    assert m["rollout_is_clip_fraction"].item() == pytest.approx(2 / 5)
    assert m["rollout_is_weight_mean"].item() == pytest.approx((w[0][0] + w[0][1] + 2.0 + 1.0 + 2.0) / 5)
    mis, m = rollout_weights(OLD, GEN, MASK, "mis", "token", 2.0)
    torch.testing.assert_close(mis, torch.tensor([[w[0][0], w[0][1], 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert m["rollout_is_weight_mean"].item() == pytest.approx((w[0][0] + w[0][1] + 1.0) / 5)


def test_sequence_level_weight_is_the_exponentiated_mean_log_ratio():
    # row 0: mean(0.5, -1.0, 1.5) = 1/3 -> e^(1/3) = 1.40 (the product e^1 would be 2.72: clipped);
    # row 1: mean(0.0, 0.7) = 0.35 -> 1.42
    s0, s1 = math.exp(1 / 3), math.exp(0.35)
    tis, m = rollout_weights(OLD, GEN, MASK, "tis", "sequence", 2.0)
    torch.testing.assert_close(tis, torch.tensor([[s0, s0, s0, 0.0], [s1, s1, 0.0, 0.0]]))
    assert m["rollout_is_clip_fraction"].item() == 0.0
    tis, m = rollout_weights(OLD, GEN, MASK, "tis", "sequence", 1.41)   # between s0 and s1
    torch.testing.assert_close(tis, torch.tensor([[s0, s0, s0, 0.0], [1.41, 1.41, 0.0, 0.0]]))
    assert m["rollout_is_clip_fraction"].item() == pytest.approx(2 / 5)
    mis, _ = rollout_weights(OLD, GEN, MASK, "mis", "sequence", 1.41)
    torch.testing.assert_close(mis, torch.tensor([[s0, s0, s0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_sampler_kl_by_hand():
    r = [0.5, -1.0, 1.5, 0.0, 0.7]                       # old - gen on the 5 response tokens
    kl = sampler_kl(OLD, GEN, MASK)
    assert kl["rollout_kl_k1"].item() == pytest.approx(-sum(r) / 5)
    assert kl["rollout_kl_k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in r) / 5, rel=1e-6)


def test_weights_multiply_the_policy_loss_only():
    from megagsm.rl.losses import policy_loss

    adv = MASK * torch.tensor([[1.0], [-1.0]])
    new = OLD + 0.01 * MASK
    plain, _ = policy_loss(new, OLD, adv, MASK, mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2,
                           loss_agg_mode="token-mean")
    ones, _ = policy_loss(new, OLD, adv, MASK, mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2,
                          loss_agg_mode="token-mean", token_weights=torch.ones_like(MASK))
    assert ones.item() == plain.item()
    w, _ = rollout_weights(OLD, GEN, MASK, "tis", "token", 2.0)
    weighted, _ = policy_loss(new, OLD, adv, MASK, mode="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2,
                              loss_agg_mode="token-mean", token_weights=w)
    by_hand = (-(adv * torch.exp(new - OLD)) * w * MASK).sum() / MASK.sum()
    assert weighted.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_routing_layout_helpers():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert real_positions(mask).tolist() == [[True, True, True, False, False], [False] * 5]
    filler = filler_routing(3, 2, 4, torch.uint8)
    assert filler.shape == (3, 2, 4) and filler[2, 1].tolist() == [0, 1, 2, 3]


def test_microbatches_carry_each_rows_rollout_routing_at_its_positions():
    from megagsm.rl.batching import Rollouts, build_minibatches, compute_advantages

    def routing(n, seed):   # [n, layers=2, k=2] distinct expert ids of 8
        return torch.randperm(8, generator=torch.Generator().manual_seed(seed))[:4].view(1, 2, 2).repeat(n, 1, 1)

    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    recorded = [routing(len(p) + len(r) - 1, i).to(torch.uint8) for i, (p, r) in enumerate(zip(prompts, responses))]
    rollouts = Rollouts(prompts=prompts, responses=responses, rewards=torch.tensor([1.0, 0.0]), mini_batch=[0, 0],
                        group_size=2, routing=recorded)
    (mb,) = build_minibatches(rollouts, compute_advantages(rollouts), 1, 4, multiple=8, dp_group=None)
    batch = mb.microbatches[0]
    assert batch["routing"].shape == (4, 8, 2, 2) and batch["routing"].dtype == torch.uint8
    for i in range(2):
        n = len(recorded[i])
        assert torch.equal(batch["routing"][i, :n], recorded[i])
        assert batch["routing"][i, n:].tolist() == [[[0, 1], [0, 1]]] * (8 - n)
        # the positions whose routing is the rollout's are the row's tokens, up to its last scored one
        assert real_positions(batch["response_mask"])[i].sum() == n
    assert batch["routing"][2:].eq(torch.tensor([0, 1], dtype=torch.uint8)).all()   # filler rows


# ---------------------------------------------------------------- one 2-rank launch

def _config(inputs, out_dir, overrides):
    from megagsm.config import load_config, validate

    cfg = load_config(None, [
        "algorithm.name=gspo", "model.init=hf", f"model.hf_dir={inputs['moe']}",
        "data.source=jsonl", f"data.train_path={inputs['train']}", f"data.eval_path={inputs['test']}",
        "data.prompt_template=bare", "data.seq_length=64", "data.max_prompt_len=40", "data.max_response_len=12",
        "optim.lr=1e-3", "optim.clip_grad=1.0", "train.micro_batch_size=4", "train.train_steps=2",
        "train.eval_at_start=false", "train.eval_accuracy=false", "train.export_hf=false",
        f"train.output_dir={out_dir}", "train.seed=3", "generation.max_new_tokens=12",
        "generation.max_batch_size=32", "parallel.ep=2",
        "algorithm.gspo.n_rollouts=4", "algorithm.gspo.prompts_per_step=4", "algorithm.gspo.mini_batches=2",
        "algorithm.gspo.filter_zero_std_groups=false", f"algorithm.gspo.reward={TOY_REWARD}", *overrides])
    validate(cfg, 2)
    return cfg


def _dispatch_hooks(routing):
    """Hooks recording, per MoE layer and forward, the routing_map megatron dispatches with."""
    maps = [[] for _ in routing.routers]
    handles = [router.register_forward_hook(lambda m, a, out, i=i: maps[i].append(out[1].detach().clone()))
               for i, router in enumerate(routing.routers)]
    return maps, handles


def _sequence_chunk(values):
    """[T, b, ...] -> this TP rank's T / tp positions under sequence parallelism (what its router sees)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    chunk = values.shape[0] // tp
    return values[ps.get_tensor_model_parallel_rank() * chunk:][:chunk]


def _rollout_maps(batch, num_experts):
    """[T*b, layers, E] bool maps of the microbatch's rollout routing, in megatron's [s, b] order."""
    routing = _sequence_chunk(batch["routing"].transpose(0, 1))
    routing = routing.reshape(-1, *routing.shape[2:])
    out = torch.zeros(*routing.shape[:2], num_experts, dtype=torch.bool)
    return out.scatter(2, routing.long().cpu(), True)


def _score_both_ways(trainer, gspo):
    """One step's rollouts, scored routing by itself and replaying the rollout's routing, in the
    packed microbatches GSPO trains on by default and in padded rows ("padded_" keys)."""
    from megagsm.rl.batching import build_minibatches, compute_advantages
    from megagsm.rl.routing_replay import RoutingPass, routing_metrics, token_positions
    from megagsm.rl.update import compute_log_probs

    rollouts, _ = gspo.collect_rollouts(0)
    advantages = compute_advantages(rollouts)
    builds = {"": gspo.minibatches(rollouts, advantages),
              "padded_": build_minibatches(rollouts, advantages, gspo.gspo.mini_batches,
                                           trainer.cfg.train.micro_batch_size, gspo.multiple)}
    assert "packed_seq_params" in builds[""][0].microbatches[0]
    out = {"sequences": len(rollouts), "bytes": sum(r.numel() for r in rollouts.routing),
           "lengths_ok": all(r.shape[0] == len(p) + len(s) - 1
                             for r, p, s in zip(rollouts.routing, rollouts.prompts, rollouts.responses))}
    for (name, key), (prefix, minibatches) in [(way, build) for way in (("natural", None), ("replayed", "routing"))
                                               for build in builds.items()]:
        maps, handles = _dispatch_hooks(gspo.routing)
        passing = RoutingPass(gspo.routing, replay_key=key, count_matches=True)
        try:
            old = compute_log_probs(trainer.chunks, minibatches, gspo.spec, with_metrics=True, routing=passing)
        finally:
            for h in handles:
                h.remove()
        # independent truth: the routing_map each layer dispatched with vs the rollout's sets
        same, total = 0, 0
        micro = [b for mb in minibatches for b in mb.microbatches]
        for j, batch in enumerate(micro):
            used = torch.stack([maps[i][j].cpu() for i in range(len(maps))], dim=1)
            real = _sequence_chunk(token_positions(batch).transpose(0, 1)).reshape(-1).cpu()
            agree = (used == _rollout_maps(batch, gspo.routing.num_experts)).all(-1)[real]
            same, total = same + int(agree.sum()), total + agree.numel()
        metrics = old.metrics.reduce(["logprob_diff_gen"])
        metrics.update(routing_metrics(old.routing_counts, rollouts.routing))
        out[prefix + name] = {"dispatched_same": same, "dispatched_total": total, **metrics}
    return out


def _counting_backward_replays():
    """Counts megatron RouterReplay top-k calls made with REPLAY_BACKWARD (recomputes)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    calls, real = [0], RouterReplay.get_replay_topk

    def counted(self, *args, **kwargs):
        calls[0] += self.router_replay_action == RouterReplayAction.REPLAY_BACKWARD
        return real(self, *args, **kwargs)

    RouterReplay.get_replay_topk = counted
    return calls, lambda: setattr(RouterReplay, "get_replay_topk", real)


def _launch(inputs, root):
    from megagsm.rl import run_gspo
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer

    out = {}
    for dtype in ("bf16", "fp32"):
        trainer = Trainer(_config(inputs, os.path.join(root, f"drift_{dtype}"), [
            f"model.dtype={dtype}", "algorithm.gspo.routing_replay=r3"]), GSPO)
        out[dtype] = _score_both_ways(trainer, trainer.algorithm)
    for case, layout in FAMILY_LAYOUTS.items():
        trainer = Trainer(_config(inputs, os.path.join(root, case), [
            f"model.hf_dir={inputs[case.removesuffix('_tp2_ep2')]}", "model.dtype=fp32",
            "algorithm.gspo.routing_replay=r3", *layout]), GSPO)
        out[case] = _score_both_ways(trainer, trainer.algorithm)
    for name, extra in (("r3_tis", []), ("r3_tis_recompute", ["model.recompute=full"]),
                        ("r2_mis_seq", ["algorithm.gspo.routing_replay=r2", "algorithm.gspo.rollout_correction=mis",
                                        "algorithm.gspo.rollout_correction_level=sequence"])):
        overrides = ["model.dtype=bf16", "algorithm.gspo.routing_replay=r3", "algorithm.gspo.rollout_correction=tis",
                     *extra]
        calls, restore = _counting_backward_replays()
        try:
            out[name] = run_gspo(_config(inputs, os.path.join(root, name), overrides)).history
        finally:
            restore()
        out[f"{name}_backward_replays"] = calls[0]
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from megagsm.demo import DemoSpec, prepare_inputs
    from megagsm.testing.tiny_moe import make_tiny_moe_model
    from megagsm.testing.tiny_runs import copy_tokenizer

    root = tmp_path_factory.mktemp("replay")
    inputs = prepare_inputs(root / "inputs", DemoSpec(n_train=64, n_test=8))
    moe = root / "moe"
    model = make_tiny_moe_model("qwen3_moe", moe, tokenizer=False, num_hidden_layers=LAYERS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_SCALE)
    model.save_pretrained(str(moe))
    copy_tokenizer(inputs["base"], moe)
    inputs["moe"] = str(moe)
    for family in ("qwen2_moe", "deepseek_v3", "deepseek_v2", "qwen3_moe"):
        inputs[family] = str(root / family)
        make_tiny_moe_model(family, root / family, tokenizer=False)
        copy_tokenizer(inputs["base"], root / family)
    results = run_ranks(_launch, 2, inputs, str(root))
    if os.environ.get("MEGAGSM_REPLAY_DUMP"):
        torch.save(results, os.environ["MEGAGSM_REPLAY_DUMP"])
    return results


@pytest.mark.multirank
@pytest.mark.parametrize("build", ["", "padded_"])
def test_r3_dispatches_exactly_the_rollout_experts_in_bf16(launch, build):
    for rank in launch:
        run = rank["bf16"]
        assert run["lengths_ok"]
        replayed = run[build + "replayed"]
        assert replayed["dispatched_total"] > 0
        assert replayed["dispatched_same"] == replayed["dispatched_total"]
    # routing by itself, bf16 drift gives some tokens other experts
    natural = [rank["bf16"][build + "natural"] for rank in launch]
    assert sum(n["dispatched_same"] for n in natural) < sum(n["dispatched_total"] for n in natural)
    r = launch[0]["bf16"]
    replayed, natural = r[build + "replayed"], r[build + "natural"]
    assert replayed["router_match_rate"] == 1.0
    assert natural["router_match_rate"] < 1.0
    # with replay on, what the routers would choose by themselves still shows the drift
    assert replayed["router_natural_match_rate"] < 1.0
    assert natural["router_natural_match_rate"] == natural["router_match_rate"]
    assert replayed["logprob_diff_gen"] < natural["logprob_diff_gen"]
    assert replayed["routing_replay_bytes"] == sum(rank["bf16"]["bytes"] for rank in launch)


@pytest.mark.multirank
@pytest.mark.parametrize("build", ["", "padded_"])
def test_rollout_token_order_matches_the_microbatch_layout_in_fp32(launch, build):
    natural = launch[0]["fp32"][build + "natural"]
    assert natural["router_match_rate"] > 0.97, natural


@pytest.mark.multirank
@pytest.mark.parametrize("build", ["", "padded_"])
@pytest.mark.parametrize("case", list(FAMILY_LAYOUTS))
def test_every_family_and_layout_replays_the_rollout_routing(launch, case, build):
    for rank in launch:
        run = rank[case]
        assert run["lengths_ok"]
        for name in ("natural", "replayed"):
            assert run[build + name]["dispatched_total"] > 0
        assert run[build + "replayed"]["dispatched_same"] == run[build + "replayed"]["dispatched_total"]
    r = launch[0][case]
    assert r[build + "replayed"]["router_match_rate"] == 1.0
    # fp32, well-separated routers: routing by itself agrees with the rollout (the token order is right)
    assert r[build + "natural"]["router_match_rate"] > 0.97, r


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["r3_tis", "r3_tis_recompute", "r2_mis_seq"])
def test_two_gspo_steps_log_replay_and_correction_metrics(launch, name):
    history = launch[0][name]
    assert sorted(history) == [1, 2]
    for step, row in history.items():
        assert row["rollout_is_weight_mean"] > 0, (step, row)
        assert 0.0 <= row["rollout_is_clip_fraction"] <= 1.0
        assert row["routing_replay_bytes"] > 0
        assert "rollout_kl_k3" in row and "router_natural_match_rate" in row
        if name.startswith("r3"):
            assert row["router_match_rate"] == 1.0, (step, row)
        assert math.isfinite(row["loss"])
    if name == "r3_tis_recompute":   # the backward's recompute replays the same routing: same run
        assert launch[0][f"{name}_backward_replays"] > 0
        assert launch[0]["r3_tis_backward_replays"] == 0
        for step in (1, 2):
            assert history[step]["loss"] == pytest.approx(launch[0]["r3_tis"][step]["loss"], rel=1e-5)


# ---------------------------------------------------------------- the sampler's quantity at temperature != 1

def test_sampler_log_probs_are_the_tempered_ones_the_trainer_scores():
    """At temperature 0.7 without top-k/top-p, rollouts store log softmax(logits / 0.7) of the sampled
    token: the quantity the trainer recomputes (LossSpec.temperature), so the weight compares like
    with like. With top-k the correction is refused (the sampler's log-probs are another policy's)."""
    from megagsm.config import load_config
    from megagsm.config.errors import ConfigError
    from megagsm.config.generation import GenerationConfig
    from megagsm.generation.sampling import Sampler
    from megagsm.rl.gspo import GSPO
    from megagsm.rl.rollout import sampling_params

    params = sampling_params(GenerationConfig(temperature=0.7, top_k=0, top_p=1.0), 1, [], seed=0)
    assert params.logprobs == "tempered"
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    tokens, logprobs = Sampler(params, torch.device("cpu"), None)(logits)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tokens.view(-1, 1)).view(-1)
    torch.testing.assert_close(logprobs.float(), expected, rtol=1e-5, atol=1e-5)
    cfg = load_config(None, ["algorithm.name=gspo", "algorithm.gspo.rollout_correction=tis", "generation.top_k=20"])
    with pytest.raises(ConfigError, match="rollout_correction"):
        GSPO.check_config(cfg)
