"""MoE auxiliary losses carry the same weight whatever the policy/SFT loss is divided by.

megatron with per-token losses (calculate_per_token_loss) scales each microbatch's aux-loss gradient
by 1 and divides all gradients by the global count, so the load-balancing coefficient would mean
coeff / tokens under token-mean and coeff / sequences under seq-mean. The independent truth is
Megatron-LM's mean-loss semantics: each microbatch's aux loss weighted 1 / (number of microbatches),
here computed by hand with plain forward/backward passes outside megatron's schedule.
"""
from functools import partial

import torch

from megagsm.testing.multirank import run_ranks

SPEC = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=64, seq_length=16, num_moe_experts=4, moe_router_topk=2, moe_load_balancing="aux_loss",
            moe_aux_loss_coeff=0.1)


def _zero_main_loss(data_iterator, model):
    """Only the aux losses send gradient; the count is what the loss would be divided by."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)

    def loss(out):
        return out.float().sum() * 0.0, batch["count"], {"lm_loss": torch.zeros(2)}

    return output, loss


def _aux_gradients():
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.training import build_optimizer, moe_aux_loss_scale, run_schedule, wrap_ddp
    from megagsm.runtime import init_runtime
    from megagsm.runtime.sharded import gather_full_state_dict, load_full_state_dict
    from megagsm.testing.parity import TinyGPTSpec, tiny_gpt_model

    parallel = ParallelConfig(use_distributed_optimizer=False)
    init_runtime(parallel, seed=3)
    spec = TinyGPTSpec(**SPEC)
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(2):
        micro.append({"tokens": torch.randint(0, 64, (2, 16), generator=g),
                      "position_ids": torch.arange(16).expand(2, 16).contiguous()})
    model = tiny_gpt_model(spec, parallel)
    init = gather_full_state_dict(model)

    # the truth: each microbatch's aux loss with weight 1 / 2, by plain autograd
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / len(micro))
    for mb in micro:
        (model[0](mb["tokens"], mb["position_ids"], None).float().sum() * 0.0).backward()
    truth = {n: p.grad.clone() for n, p in model[0].named_parameters() if "router" in n}

    out = {}
    # loss counts of the two microbatches: very different token counts, or 2 sequences each
    for mode, counts in (("token_mean", [30, 6]), ("seq_mean", [2, 2]), ("unscaled", [30, 6])):
        chunks = tiny_gpt_model(spec, parallel)
        load_full_state_dict(chunks, init)
        chunks = wrap_ddp(chunks, parallel)
        build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=False))
        batches = [dict(mb, count=torch.tensor(c)) for mb, c in zip(micro, counts)]
        for c in chunks:
            c.zero_grad_buffer()
        total = None if mode == "unscaled" else float(sum(counts))
        with moe_aux_loss_scale(chunks, total, len(batches)):
            run_schedule(chunks, batches, len(batches), 16, 2, partial(_zero_main_loss), forward_only=False)
        grads = {n.removeprefix("module."): p.main_grad.clone() for n, p in chunks[0].named_parameters() if "router" in n}
        out[mode] = max((grads[n] - t).abs().max().item() for n, t in truth.items())
    out["truth_norm"] = max(t.abs().max().item() for t in truth.values())
    return out


def test_aux_loss_weight_is_the_same_under_token_and_sequence_means():
    result = run_ranks(_aux_gradients, 1)[0]
    assert result["truth_norm"] > 1e-4  # the aux loss does send a gradient to the router
    assert result["token_mean"] < 1e-5 * result["truth_norm"]
    assert result["seq_mean"] < 1e-5 * result["truth_norm"]
    # without the scale megatron's per-token path divides by 36 tokens instead of averaging 2 microbatches
    assert result["unscaled"] > 0.5 * result["truth_norm"]
