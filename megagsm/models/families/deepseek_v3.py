"""DeepSeek V3 / R1 (DeepseekV3ForCausalLM). The official FP8 checkpoints must be dequantized to bf16 first.

Routing (transformers' DeepseekV3TopkRouter, the original `noaux_tc`): sigmoid scores; the
`e_score_correction_bias` (megatron's router expert_bias) is added for choosing, not for weighting;
`n_group` groups ranked by the sum of their top-2 biased scores, best `topk_group` kept; top
`num_experts_per_tok` weights renormalised (`norm_topk_prob`) and multiplied by `routed_scaling_factor`.
megatron ranks groups by their top `num_experts_per_tok // topk_group` scores: the same when that is 2,
as in every released V3 config (8 // 4); other group shapes are refused. See deepseek.py for the rest.
"""
from megagsm.models.families import deepseek, moe
from megagsm.models.families.base import Family, need, reject


def settings(hf: dict):
    reject(hf, "scoring_func", (None, "sigmoid"))
    reject(hf, "topk_method", (None, "noaux_tc"))
    experts = deepseek.num_experts(hf)
    router = moe.router_fields(
        hf, score="sigmoid", topk=int(need(hf, "num_experts_per_tok")), num_experts=experts,
        normalize=bool(hf.get("norm_topk_prob", True)), num_groups=need(hf, "n_group"),
        group_topk=need(hf, "topk_group"), group_score_topk=2,
        # required: transformers' DeepseekV3Config defaults to 2.5, the original remote code to 1.0
        scaling=float(need(hf, "routed_scaling_factor")), expert_bias=True,
    )
    return deepseek.with_experts(hf, deepseek.mla_settings(hf), router)


def weights(hf: dict):
    return deepseek.mla_weights(hf, expert_bias=True, mtp_default=1)  # DeepseekV3Config's default


FAMILY = Family(model_type="deepseek_v3", settings=settings, weights=weights, layer_spec_fn=moe.layer_spec_fn,
                is_moe=True, check_layout=moe.check_expert_layout)
