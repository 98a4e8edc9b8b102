"""DeepSeek V2 / V2-Lite / Coder-V2 (DeepseekV2ForCausalLM).

Routing (transformers' DeepseekV2TopkRouter): softmax over all experts, top `num_experts_per_tok`
(`topk_method` greedy), weights not renormalised, times `routed_scaling_factor` (megatron:
pre-softmax routing with a top-k scaling factor). `group_limited_greedy` ranks `n_group` groups by
their best score: megatron does the same when num_experts_per_tok // topk_group == 1; other shapes
(the full V2's 6 of 3 groups) are refused. transformers' V2 never renormalises, so
`norm_topk_prob: true` (which the original code honoured) is refused as ambiguous. See deepseek.py.
"""
from megagsm.models.families import deepseek, moe
from megagsm.models.families.base import Family, need, reject


def settings(hf: dict):
    reject(hf, "scoring_func", (None, "softmax"))
    reject(hf, "topk_method", (None, "greedy", "group_limited_greedy"))
    reject(hf, "norm_topk_prob", (None, False),
           "transformers' DeepseekV2 ignores it while the original code renormalised: ambiguous")
    grouped = hf.get("topk_method") == "group_limited_greedy"
    router = moe.router_fields(
        hf, score="softmax", topk=int(need(hf, "num_experts_per_tok")), num_experts=deepseek.num_experts(hf),
        normalize=False, num_groups=hf.get("n_group") if grouped else None,
        group_topk=hf.get("topk_group") if grouped else None, group_score_topk=1,
        scaling=float(hf.get("routed_scaling_factor", 1.0)),
    )
    return deepseek.with_experts(hf, deepseek.mla_settings(hf), router)


def weights(hf: dict):
    return deepseek.mla_weights(hf, expert_bias=False)


FAMILY = Family(model_type="deepseek_v2", settings=settings, weights=weights, layer_spec_fn=moe.layer_spec_fn,
                is_moe=True, check_layout=moe.check_expert_layout)
