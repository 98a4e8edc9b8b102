"""GSPO with LoRA (train.lora.enabled=true), one 2-rank launch for every case.

End to end (the shared trainer, in-process rollouts, a toy reward a random policy earns about half the
time): 2 GSPO steps at TP2, TP2+SP, DP2 (distributed optimizer), PP2 and on a tiny Qwen2-MoE (EP2) train
the adapters only: every base weight is bit-identical before and after, every adapter factor A moved,
and the metrics are those of full GSPO. LoRA dropout is 0.5 in those runs: GSPO runs the adapters
without dropout (log-prob passes in eval mode, updates with adapter dropout off), so with one
mini-batch and one epoch per step each update is exactly on-policy: the old log-probs equal the
update's own (sequence ratio exactly 1, nothing clipped) at every step, B != 0 from step 2 on.

The KL reference under LoRA is the same model with its adapters off: its log-probs equal those of a
fresh model holding only the base weights (an independent model, no adapters ever attached). Rollouts
sample from base + adapters: greedy completions equal those of the merged model (merge_lora after).

Checkpoints: a 3-step run with kl_coef > 0 (save every step) equals a 2-step run resumed for 1, to the
bit (losses and weights). The final HF export (adapters merged) gives the logits of the merged megatron
model; the PEFT adapter export loaded by peft onto the HF base model gives the same logits (dense
Qwen2 at DP2 and the Qwen2-MoE run, whose adapters sit on per-layer and stacked keys and on the shared
expert). The peft checks are skipped when peft is not installed (pyproject's `test` extra).

Tolerances: the same model in one process agrees to the bit (== 0). HF (transformers) vs megatron
logits of one model agree to ~1e-6 in fp32 (README: ~2e-7 measured); 1e-4 leaves margin while a
mis-mapped adapter row moves logits by >1e-2 (adapters are trained at lr 1e-2 and B is perturbed).
"""
import math
import os

import pytest
import torch

from megagsm.rewards import register_reward
from megagsm.testing.multirank import run_ranks

pytestmark = pytest.mark.multirank

TOY_REWARD = "test_lora_has_digit"
HF_ATOL = 1e-4


@register_reward(TOY_REWARD)
def has_digit(solution_str, ground_truth, **kwargs):
    return 1.0 if any(c.isdigit() for c in solution_str) else 0.0


LORA = ["train.lora.enabled=true", "train.lora.rank=4", "train.lora.alpha=8.0", "train.lora.dropout=0.5"]


def _config(inputs, out_dir, overrides):
    from megagsm.testing.tiny_runs import tiny_run_config

    return tiny_run_config(inputs, out_dir, [
        "optim.lr=1e-2", "optim.weight_decay=0.0", "optim.clip_grad=1.0", "optim.adam_eps=1e-6",
        "train.micro_batch_size=4", "train.train_steps=2", "algorithm.gspo.mini_batches=1",
        f"algorithm.gspo.reward={TOY_REWARD}", *LORA, *overrides])


def _split(state: dict) -> tuple[dict, dict]:
    base = {k: v for k, v in state.items() if "_lora." not in k}
    return base, {k: v for k, v in state.items() if "_lora." in k}


def _trained_run(inputs, out_dir, overrides) -> dict:
    from megagsm.rl.gspo import GSPO
    from megagsm.train import Trainer
    from megagsm.utils.metrics import read_metrics

    trainer = Trainer(_config(inputs, out_dir, overrides), GSPO)
    trainer.restore = _restore_once(trainer)  # the weights before training are those after restore
    trainer.finish = _trained_state_kept(trainer)  # ... and after it those before the export merges
    trainable = sorted(n for c in trainer.chunks for n, p in c.named_parameters() if p.requires_grad)
    result = trainer.fit()
    before_base, before_adapters = _split(trainer.before)
    after_base, after_adapters = _split(trainer.after)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    return {"history": result.history, "rows": read_metrics(os.path.join(out_dir, "metrics.jsonl")),
            "export": result.hf_export, "adapter": result.hf_adapter, "tokens": tokens,
            "base_moved": max((after_base[k] - v).abs().max().item() for k, v in before_base.items()),
            "base_keys": sorted(before_base), "adapter_keys": sorted(before_adapters),
            "a_moved": min((after_adapters[k] - v).abs().max().item() for k, v in before_adapters.items()
                           if k.endswith("weight_a")),
            "trainable": trainable,
            "snapshot_bytes": trainer.snapshot_bytes}


def _trained_state_kept(trainer):
    from megagsm.runtime.sharded import gather_full_state_dict

    finish = trainer.finish

    def wrapped():
        from megagsm.rl.reference import ReferencePolicy

        trainer.after = gather_full_state_dict(trainer.chunks)
        # what full-FT GSPO's KL reference would hold on the host for this model (adapters included)
        trainer.snapshot_bytes = ReferencePolicy(trainer.chunks).snapshot_bytes
        return finish()

    return wrapped


def _restore_once(trainer):
    from megagsm.runtime.sharded import gather_full_state_dict

    restore = trainer.restore

    def wrapped():
        restore()
        trainer.before = gather_full_state_dict(trainer.chunks)

    return wrapped


def _fixed_minibatches(parallel, vocab=100):
    """One mini-batch of fixed prompts/responses (every group mixed), this DP rank's share."""
    from megagsm.models.training import sequence_length_multiple
    from megagsm.rl.batching import Rollouts, build_minibatches, compute_advantages
    from megagsm.runtime.collectives import dp_rank_and_size

    dp_rank, dp_size = dp_rank_and_size()
    g = torch.Generator().manual_seed(11)
    prompts, responses = [], []
    for _ in range(4 * 4):
        prompts.append(torch.randint(1, vocab, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist())
        responses.append(torch.randint(1, vocab, (int(torch.randint(1, 13, (1,), generator=g)),),
                                       generator=g).tolist())
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0] * 4)
    per = 16 // dp_size
    mine = slice(dp_rank * per, (dp_rank + 1) * per)
    rollouts = Rollouts(prompts=prompts[mine], responses=responses[mine], rewards=rewards[mine],
                        mini_batch=[0] * per, group_size=4)
    return build_minibatches(rollouts, compute_advantages(rollouts), 1, 3, sequence_length_multiple(parallel))


def _spec():
    from megagsm.testing.parity import TinyGPTSpec

    return TinyGPTSpec(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=128, seq_length=32)


def _perturb_b(chunks, seed=7):
    """Non-zero B (layout-free, the same on every layout), so the adapters change the model."""
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict

    gen = torch.Generator().manual_seed(seed)
    full = gather_full_state_dict(chunks)
    load_full_state_dict(chunks, {k: (torch.randn(v.shape, generator=gen) * 0.3 if k.endswith("weight_b") else v)
                                  for k, v in full.items()})


def _flat(log_probs) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for mb in log_probs.values for t in mb]) if log_probs.values[0] else torch.zeros(0)


def _unit_cases(parallel, sp_parallel) -> dict:
    """Reference under adapters-off vs a fresh base model; deterministic log-prob passes with dropout;
    greedy rollouts from base + adapters vs the merged model (TP2 and TP2+SP)."""
    from megagsm.config.train import LoraConfig
    from megagsm.generation import SamplingParams, generate
    from megagsm.models.lora import adapters_disabled, apply_lora, merge_lora
    from megagsm.rl.reference import FrozenBaseReference, ReferencePolicy
    from megagsm.rl.update import LossSpec, compute_log_probs
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.testing.parity import tiny_gpt_model

    out = {}
    spec = LossSpec(vocab_limit=100)
    init_runtime(parallel, seed=5)
    base = tiny_gpt_model(_spec(), parallel)
    base_state = gather_full_state_dict(base)
    chunks = apply_lora(tiny_gpt_model(_spec(), parallel), LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.5))
    load_full_state_dict([c for c in chunks], {**gather_full_state_dict(chunks), **base_state})
    _perturb_b(chunks)
    for c in chunks:
        c.train()
    minibatches = _fixed_minibatches(parallel)
    with FrozenBaseReference(chunks).swapped_in():
        reference = _flat(compute_log_probs(chunks, minibatches, spec))
    fresh = tiny_gpt_model(_spec(), parallel)   # an independent model: the base weights, never adapted
    load_full_state_dict(fresh, base_state)
    out["ref_vs_fresh_base"] = (reference - _flat(compute_log_probs(fresh, minibatches, spec))).abs().max().item()
    first = _flat(compute_log_probs(chunks, minibatches, spec))
    second = _flat(compute_log_probs(chunks, minibatches, spec))
    out["adapters_matter"] = (first - reference).abs().max().item()
    out["logprob_pass_repeat"] = (first - second).abs().max().item()
    out["train_mode_restored"] = all(m.training for c in chunks for m in c.modules())
    out["adapters_back_on"] = (first - _flat(compute_log_probs(chunks, minibatches, spec))).abs().max().item()
    out["snapshot_bytes_tp2"] = ReferencePolicy(chunks).snapshot_bytes
    out["param_bytes_tp2"] = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())

    # greedy rollouts: base + adapters (hooks, no merged copy) vs the merged model, TP2 and TP2+SP
    prompts = [[5, 17, 33, 2, 9], [40, 41, 42], [7] * 9, [90, 3, 61, 12, 8, 77, 1]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, n=1, seed=0)
    for name, layout in (("tp2", parallel), ("tp2_sp", sp_parallel)):
        init_runtime(layout, seed=5)
        model = apply_lora(tiny_gpt_model(_spec(), layout), LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.5))
        load_full_state_dict(model, {**gather_full_state_dict(model), **base_state})
        _perturb_b(model)
        with adapters_disabled(model):
            base_tokens = generate(model, prompts, params, vocab_limit=100).tokens
        adapted = generate(model, prompts, params, vocab_limit=100).tokens
        merge_lora(model)
        merged = generate(model, prompts, params, vocab_limit=100).tokens
        out[f"greedy_{name}"] = {"adapted": adapted, "merged": merged, "base": base_tokens}
    return out


def _merged_logits(chunks, tokens) -> torch.Tensor:
    from megagsm.models.gpt import unwrap_model

    model = unwrap_model(chunks[0])
    model.eval()
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model(tokens, pos, None, runtime_gather_output=True).detach().clone()


def _resume_pair(inputs, root) -> dict:
    """kl_coef > 0 (the adapters-off reference), DP2, from HF weights, exported: 3 steps vs 2 + 1."""
    from megagsm.rl import run_gspo
    from megagsm.rl.gspo import GSPO
    from megagsm.runtime.sharded import gather_full_state_dict
    from megagsm.train import Trainer

    common = ["model.init=hf", f"model.hf_dir={inputs['hf_init']}", "parallel.use_distributed_optimizer=true",
              "train.save_interval=1", "algorithm.gspo.kl_coef=0.05", "algorithm.gspo.mini_batches=2",
              "algorithm.gspo.ppo_epochs=2", "train.export_hf=true"]
    out = {}
    full = Trainer(_config(inputs, os.path.join(root, "full"), common + ["train.train_steps=3"]), GSPO)
    result = full.fit()
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    out["full"] = {"history": result.history, "params": gather_full_state_dict(full.chunks, dst=0),
                   "export": result.hf_export, "adapter": result.hf_adapter, "tokens": tokens,
                   "merged_logits": _merged_logits(full.chunks, tokens),
                   "reference": type(full.algorithm.reference).__name__}
    run_gspo(_config(inputs, os.path.join(root, "resumed"), common + ["train.train_steps=2"]))
    resumed = Trainer(_config(inputs, os.path.join(root, "resumed"), common + ["train.train_steps=3",
                                                                                 "train.resume=auto"]), GSPO)
    result = resumed.fit()
    out["resumed"] = {"history": result.history, "from": result.resumed_from,
                      "params": gather_full_state_dict(resumed.chunks, dst=0)}
    return out


def _launch(inputs, root):
    from megagsm.config.parallel import ParallelConfig

    out = {"unit": _unit_cases(ParallelConfig(tp=2, use_distributed_optimizer=False),
                               ParallelConfig(tp=2, sequence_parallel=True, use_distributed_optimizer=False))}
    runs = {
        "tp2": ["parallel.tp=2", "train.eval_at_start=true", "train.eval_accuracy=true", "train.eval_max_examples=4"],
        "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "dp2": ["parallel.use_distributed_optimizer=true"],
        "pp2": ["parallel.pp=2"],
        "moe_ep2": ["model.init=hf", f"model.hf_dir={inputs['moe']}", f"model.tokenizer={inputs['base']}",
                    "parallel.ep=2", "train.export_hf=true"],
    }
    out["runs"] = {name: _trained_run(inputs, os.path.join(root, name), o) for name, o in runs.items()}
    out["resume"] = _resume_pair(inputs, root)
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from megagsm.demo import TINY_MODEL, DemoSpec, prepare_inputs
    from megagsm.testing.tiny_moe import make_tiny_moe_model
    from megagsm.testing.tiny_runs import hf_model_dir

    root = tmp_path_factory.mktemp("gspo_lora")
    tiny = DemoSpec(n_train=64, n_test=8, model=TINY_MODEL)
    inputs = prepare_inputs(root / "inputs", tiny)
    inputs["hf_init"] = hf_model_dir(inputs["base"], root / "hf_init")
    # Qwen2-MoE: dense layer 0, 8 experts top-2 with a gated shared expert in layers 1-2
    make_tiny_moe_model("qwen2_moe", root / "moe", tokenizer=False, vocab_size=max(300, inputs["tokenizer_size"]),
                        max_position_embeddings=64)
    inputs["moe"] = str(root / "moe")
    return run_ranks(_launch, 2, inputs, str(root), timeout=1200)[0], inputs


def test_only_adapters_train_at_every_layout(launch):
    out, _ = launch
    for name, run in out["runs"].items():
        assert run["base_moved"] == 0.0, name                  # every base weight bit-identical
        assert run["a_moved"] > 1e-4, name                       # every A factor moved
        assert run["adapter_keys"] and all("_lora." in n for n in run["trainable"]), name
        assert all(any(s in n for s in ("linear_qkv_lora", "linear_proj_lora", "linear_fc1_lora",
                                        "linear_fc2_lora")) for n in run["trainable"]), name


def test_moe_adapters_on_attention_and_dense_mlps_not_experts(launch):
    out, _ = launch
    keys = out["runs"]["moe_ep2"]["adapter_keys"]
    assert not [k for k in keys if ".experts." in k and "shared_experts" not in k]
    assert any("self_attention.linear_qkv_lora" in k for k in keys)
    assert any("shared_experts.linear_fc1_lora" in k for k in keys)
    assert any(k.startswith("decoder.layers.0.mlp.linear_fc1_lora") or ".layers.mlp.linear_fc1_lora" in k
               for k in keys), keys   # layer 0's dense MLP
    assert any(".experts." in k for k in out["runs"]["moe_ep2"]["base_keys"])  # the experts exist, frozen


def test_moe_peft_adapter_gives_the_merged_export_logits(launch):
    """Qwen2-MoE: per-layer keys for the dense layer 0, stacked ones for the MoE layers, adapters on
    the shared expert and none on routed experts (PEFT's target_modules name full paths)."""
    import json

    from transformers import AutoModelForCausalLM

    out, inputs = launch
    run = out["runs"]["moe_ep2"]
    with open(os.path.join(run["adapter"], "adapter_config.json")) as f:
        targets = json.load(f)["target_modules"]
    assert "model.layers.0.mlp.gate_proj" in targets and "model.layers.1.mlp.shared_expert.up_proj" in targets
    assert "model.layers.2.self_attn.v_proj" in targets and not [t for t in targets if ".experts." in t]
    peft = pytest.importorskip("peft")
    tokens = run["tokens"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run["export"]).eval()(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(inputs["moe"]).eval()
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, run["adapter"]).eval()(tokens).logits
    assert (adapted - base_logits).abs().max().item() > 1e-3
    assert (adapted - merged).abs().max().item() < HF_ATOL


def test_metrics_are_logged_like_full_gspo_and_updates_are_on_policy(launch):
    out, _ = launch
    for name, run in out["runs"].items():
        rows = [r for r in run["rows"] if r["phase"] == "gspo"]
        assert [r["step"] for r in rows][-2:] == [1, 2], name
        for row in rows[-2:]:
            for key in ("reward_mean", "reward_std", "rollout_accuracy", "response_length", "pg_clipfrac",
                        "entropy", "loss", "grad_norm", "time_generate", "tokens_per_s"):
                assert key in row and math.isfinite(row[key]), (name, key)
            assert row["updates"] == 1
            # dropout 0.5 configured, yet the old log-probs are the update's own: ratio exactly 1
            assert row["seq_ratio_mean"] == 1.0 and row["pg_clipfrac"] == 0.0, (name, row["seq_ratio_mean"])
            assert row["logprob_diff_gen"] < 1e-4, name  # the sampler used base + adapters, no dropout
    tp2 = [r for r in out["runs"]["tp2"]["rows"] if r["phase"] == "gspo"]
    assert "accuracy" in tp2[0] and "accuracy" in tp2[-1]


def test_log_prob_pass_is_deterministic_under_dropout(launch):
    unit = launch[0]["unit"]
    assert unit["logprob_pass_repeat"] == 0.0
    assert unit["train_mode_restored"]
    assert unit["adapters_back_on"] == 0.0


def test_reference_is_the_base_model_with_adapters_off(launch):
    unit = launch[0]["unit"]
    assert unit["ref_vs_fresh_base"] == 0.0
    assert unit["adapters_matter"] > 1e-2


def test_rollouts_from_base_plus_adapters_equal_the_merged_model(launch):
    unit = launch[0]["unit"]
    for name in ("tp2", "tp2_sp"):
        greedy = unit[f"greedy_{name}"]
        assert torch.equal(greedy["adapted"], greedy["merged"]), name
        assert not torch.equal(greedy["adapted"], greedy["base"]), name  # the adapters change the rollouts


def test_no_host_snapshot_under_lora(launch):
    out, _ = launch
    assert out["resume"]["full"]["reference"] == "FrozenBaseReference"
    unit = out["unit"]
    # the snapshot full-FT GSPO takes: every parameter of this rank, once (and again while swapped in)
    assert unit["snapshot_bytes_tp2"] == unit["param_bytes_tp2"] > 0
    print(f"\nhost snapshot avoided per rank: TP2 unit model {unit['snapshot_bytes_tp2']} B; "
          + ", ".join(f"{n} {r['snapshot_bytes']} B" for n, r in out["runs"].items()))


def test_resume_is_bit_identical(launch):
    out, _ = launch
    full, resumed = out["resume"]["full"], out["resume"]["resumed"]
    assert resumed["from"].endswith("iter_0000002") and sorted(resumed["history"]) == [3]
    a, b = full["history"][3], resumed["history"][3]
    assert a["kl_loss"] > 0
    for key in ("reward_mean", "loss", "grad_norm", "entropy", "kl_loss", "approx_kl_k3", "response_length"):
        assert a[key] == b[key], key
    assert set(full["params"]) == set(resumed["params"])
    assert all(torch.equal(full["params"][k], resumed["params"][k]) for k in full["params"])


def test_hf_export_and_peft_adapter_give_the_merged_logits(launch):
    from transformers import AutoModelForCausalLM

    out, inputs = launch
    full = out["resume"]["full"]
    tokens, merged = full["tokens"], full["merged_logits"]
    exported = AutoModelForCausalLM.from_pretrained(full["export"]).eval()
    vocab = exported.config.vocab_size
    with torch.no_grad():
        hf_logits = exported(tokens).logits
    assert (hf_logits - merged[..., :vocab]).abs().max().item() < HF_ATOL
    assert sorted(os.listdir(full["adapter"])) == ["adapter_config.json", "adapter_model.safetensors"]
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(inputs["hf_init"]).eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, full["adapter"]).eval()
        peft_logits = adapted(tokens).logits
    assert (peft_logits - base_logits).abs().max().item() > 1e-3   # the adapters do something
    assert (peft_logits - hf_logits).abs().max().item() < HF_ATOL


def test_peft_adapter_from_a_checkpoint_equals_the_trainers(launch, tmp_path):
    """One process, from the last trainer checkpoint (adapter tensors read alone): the same files."""
    import json

    from safetensors.torch import load_file

    from megagsm.checkpoint.peft_export import export_peft_adapter
    from megagsm.config.train import LoraConfig

    out, _ = launch
    full = out["resume"]["full"]
    ckpt = os.path.join(os.path.dirname(full["export"]), "checkpoints", "iter_0000003")
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=0.5)
    got = export_peft_adapter(ckpt, str(tmp_path / "adapter"), lora)
    a, b = load_file(os.path.join(got, "adapter_model.safetensors")), load_file(
        os.path.join(full["adapter"], "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(got, "adapter_config.json")) as f1, open(os.path.join(full["adapter"],
                                                                           "adapter_config.json")) as f2:
        c1, c2 = json.load(f1), json.load(f2)
    assert c1.pop("base_model_name_or_path") is None and c2.pop("base_model_name_or_path")
    assert c1 == c2
