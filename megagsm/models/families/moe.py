"""Shared pieces of the mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, DeepSeek V2/V3).

Routing: each family states its HF routing function (score function, top-k, whether the top-k
weights are renormalised, expert groups, scaling, expert bias) and `router_fields` turns it into
megatron's router settings, or refuses it when megatron computes something else. Never an approximation.

Weights: rules are written once in megatron's stacked form (a "layer" axis, plus an "expert" axis
for routed experts) and tagged with the layers they belong to: every layer, dense-MLP layers only or
MoE layers only. When every layer is an MoE layer megatron stores the stacked form; when dense and
MoE layers are mixed it names each layer's tensors by layer number (`decoder.layers.3.mlp.router.weight`),
and `layer_rules` expands the rules accordingly. Routed experts keep their "expert" axis, indexed by
the *global* expert number: megatron resolves which experts an EP rank holds, so conversion reads and
writes exactly the experts each rank owns.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from megagsm.models.errors import ModelInputError
from megagsm.models.families.base import reject
from megagsm.models.mapping import WeightRule

ALL, DENSE, MOE = "all", "dense", "moe"   # which layers a per-layer rule applies to


def field(hf: dict, *names, default=None):
    """The first of several spellings of a config field that is present (Hub configs and
    transformers 5 sometimes name the same thing differently, e.g. num_experts / num_local_experts)."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def need_field(hf: dict, *names):
    value = field(hf, *names)
    if value is None:
        raise ModelInputError(f"config.json: field {names[0]!r}{''.join(f' (or {n!r})' for n in names[1:])} "
                              f"is required for model_type {hf.get('model_type')!r}")
    return value


def no_quantization(hf: dict) -> None:
    reject(hf, "quantization_config", lambda v: not v,
           "quantized checkpoints (e.g. FP8 block-scaled weights) must be dequantized to bf16/fp32 first")


# ---------------------------------------------------------------------------------------------- routing

def router_fields(hf: dict, *, score: str, topk: int, num_experts: int, normalize: bool,
                  num_groups: int | None = None, group_topk: int | None = None,
                  group_score_topk: int | None = None, scaling: float | None = None,
                  expert_bias: bool = False) -> dict:
    """megatron router settings computing exactly the HF routing below, or ModelInputError.

    HF: scores = softmax(logits) or sigmoid(logits); with groups, keep the `group_topk` groups whose
    best `group_score_topk` scores (plus expert bias) sum highest; pick the top-k experts by score (plus
    bias); weights = their scores, divided by their sum when `normalize`, times `scaling`.
    """
    model_type = hf.get("model_type")
    if not 1 <= topk <= num_experts:
        raise ModelInputError(f"config.json: num_experts_per_tok={topk} must be within 1..{num_experts}")
    out = dict(moe_router_topk=topk, moe_router_score_function=score)
    if score == "softmax":
        if expert_bias:
            raise ModelInputError(f"{model_type}: an expert bias with softmax scores is not supported")
        if normalize and topk == 1:
            raise ModelInputError(
                f"config.json: norm_topk_prob=true with num_experts_per_tok=1 is not supported for "
                f"{model_type!r} (megatron needs softmax before top-1 selection, which is not normalised)")
        # softmax over the top-k logits == top-k of the softmax, renormalised; pre-softmax keeps the
        # full-softmax values unnormalised
        out["moe_router_pre_softmax"] = not normalize
    elif score == "sigmoid":
        # megatron divides sigmoid top-k weights by their sum whenever top-k > 1, and never for top-1
        if normalize != (topk > 1):
            raise ModelInputError(
                f"config.json: norm_topk_prob={str(normalize).lower()} with num_experts_per_tok={topk} "
                f"and sigmoid scores is not supported for {model_type!r} (megatron renormalises sigmoid "
                "top-k weights exactly when top-k > 1)")
        out["moe_router_enable_expert_bias"] = expert_bias
    else:
        raise ModelInputError(f"{model_type}: score function {score!r} is not supported")
    if num_groups is not None and num_groups > 1:
        if not group_topk or num_experts % num_groups or group_topk > num_groups:
            raise ModelInputError(
                f"config.json: n_group={num_groups}, topk_group={group_topk} do not split "
                f"{num_experts} experts for {model_type!r}")
        # megatron ranks a group by the sum of its best topk // group_topk scores
        if topk // group_topk != group_score_topk:
            raise ModelInputError(
                f"config.json: group-limited routing with num_experts_per_tok={topk}, topk_group={group_topk} "
                f"is not supported for {model_type!r}: the HF model ranks groups by their best "
                f"{group_score_topk} score(s), megatron by their best num_experts_per_tok // topk_group = "
                f"{topk // group_topk}")
        out.update(moe_router_num_groups=num_groups, moe_router_group_topk=group_topk)
    if scaling is not None and scaling != 1.0:
        out["moe_router_topk_scaling_factor"] = float(scaling)
    return out


def moe_fields(hf: dict, *, num_experts: int, expert_ffn: int, pattern: list[int], router: dict,
               shared_ffn: int | None = None, shared_gate: bool = False,
               router_dtype: str | None = None) -> dict:
    """TransformerConfig MoE kwargs. pattern[i] = 1 for an MoE layer, 0 for a dense-MLP layer."""
    from megagsm.layers.spec import HAVE_TE

    if not any(pattern):
        raise ModelInputError(f"config.json: no layer of this {hf.get('model_type')!r} model has experts "
                              "(check mlp_only_layers / decoder_sparse_step / first_k_dense_replace)")
    return dict(
        num_moe_experts=int(num_experts),
        moe_ffn_hidden_size=int(expert_ffn),
        # an int N in megatron means "layers 0, N, 2N.. are MoE", not HF's convention: always a list
        # unless every layer is MoE (which also selects megatron's stacked checkpoint layout)
        moe_layer_freq=1 if all(pattern) else list(pattern),
        moe_shared_expert_intermediate_size=int(shared_ffn) if shared_ffn else None,
        moe_shared_expert_gate=bool(shared_ffn and shared_gate),
        moe_router_dtype=router_dtype,
        # training-time defaults (megagsm.config.moe.MoEConfig overrides them)
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_bias_update_rate=0.0,
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=HAVE_TE,
        **router,
    )


def check_expert_layout(config: dict, parallel) -> None:
    experts = config.get("num_moe_experts")
    if experts and experts % parallel.ep:
        raise ModelInputError(f"layout: the model's {experts} routed experts do not split over ep={parallel.ep}")
    etp = parallel.expert_tp
    if experts and config["moe_ffn_hidden_size"] % etp:
        raise ModelInputError(f"layout: moe_intermediate_size={config['moe_ffn_hidden_size']} is not "
                              f"divisible by the expert tensor-parallel size {etp}")
    shared = config.get("moe_shared_expert_intermediate_size")
    if shared and shared % parallel.tp:
        raise ModelInputError(f"layout: shared expert size {shared} is not divisible by tp={parallel.tp}")


# ---------------------------------------------------------------------------------------------- weights

def layer(mcore: str, *hf: str, transform: str = "copy") -> WeightRule:
    """A stacked per-layer rule: mcore under decoder.layers., HF names under model.layers.{layer}."""
    return WeightRule(f"decoder.layers.{mcore}", tuple(f"model.layers.{{layer}}.{h}" for h in hf),
                      transform, ("layer",))


def expert(mcore: str, *hf: str, transform: str = "copy") -> WeightRule:
    """A routed-expert rule: one megatron tensor per (layer, global expert)."""
    return WeightRule(f"decoder.layers.mlp.experts.experts.{mcore}",
                      tuple(f"model.layers.{{layer}}.mlp.experts.{{expert}}.{h}" for h in hf),
                      transform, ("layer", "expert"))


def moe_mlp_rules(*, shared: str | None = None, shared_gate: str | None = None,
                  expert_bias: bool = False, fp32_router: bool = False) -> list[tuple[WeightRule, str]]:
    """The MoE-layer MLP: pre-MLP norm, router, routed experts (SwiGLU), optional shared experts.
    shared: HF module name of the shared expert MLP ("shared_expert" in Qwen2-MoE, "shared_experts"
    in DeepSeek); shared_gate: HF name of its sigmoid gate. fp32_router: transformers keeps the router
    weight in fp32 whatever the model dtype (DeepSeek's _keep_in_fp32_modules_strict), so an export's
    --dtype leaves it as megatron stored it."""
    router = layer("mlp.router.weight", "mlp.gate.weight")
    rules = [
        layer("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
        replace(router, cast=False) if fp32_router else router,
        expert("linear_fc1.weight", "gate_proj.weight", "up_proj.weight", transform="gate_up"),
        expert("linear_fc2.weight", "down_proj.weight"),
    ]
    if expert_bias:
        # fp32 in megatron and in transformers (_keep_in_fp32_modules_strict) whatever the model dtype
        rules.append(replace(layer("mlp.router.expert_bias", "mlp.gate.e_score_correction_bias"), cast=False))
    if shared:
        rules += [
            layer("mlp.shared_experts.linear_fc1.weight", f"mlp.{shared}.gate_proj.weight",
                  f"mlp.{shared}.up_proj.weight", transform="gate_up"),
            layer("mlp.shared_experts.linear_fc2.weight", f"mlp.{shared}.down_proj.weight"),
        ]
    if shared and shared_gate:
        rules.append(layer("mlp.shared_experts.gate_weight", f"mlp.{shared_gate}.weight"))
    return [(r, MOE) for r in rules]


def dense_mlp_rules() -> list[tuple[WeightRule, str]]:
    return [(r, DENSE) for r in (
        layer("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
        layer("mlp.linear_fc1.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", transform="gate_up"),
        layer("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    )]


def at_layer(rule: WeightRule, index: int) -> WeightRule:
    """A stacked rule for one layer, as megatron names it when layers are not all alike."""
    if not rule.axes or rule.axes[0] != "layer" or not rule.mcore.startswith("decoder.layers."):
        raise ValueError(f"{rule.mcore}: not a stacked per-layer rule")
    return replace(
        rule,
        mcore=rule.mcore.replace("decoder.layers.", f"decoder.layers.{index}.", 1),
        hf=tuple(t.replace("{layer}", str(index)) for t in rule.hf),
        axes=rule.axes[1:],
    )


def layer_rules(tagged: Iterable[tuple[WeightRule, str]], pattern: list[int]) -> list[WeightRule]:
    """Per-layer rules in the form megatron stores them for this MoE layer pattern."""
    tagged = list(tagged)
    if all(pattern):
        return [r for r, kind in tagged if kind in (ALL, MOE)]
    out = []
    for i, is_moe in enumerate(pattern):
        out += [at_layer(r, i) for r, kind in tagged if kind == ALL or kind == (MOE if is_moe else DENSE)]
    return out


def split_dense_rules(rules: Iterable[WeightRule]) -> tuple[list[WeightRule], list[tuple[WeightRule, str]]]:
    """A dense family's rules -> (model-level rules, per-layer rules tagged ALL/DENSE): its MLP rules
    become dense-layer-only."""
    top, per_layer = [], []
    for r in rules:
        if not r.mcore.startswith("decoder.layers."):
            top.append(r)
        else:
            per_layer.append((r, DENSE if r.mcore.startswith("decoder.layers.mlp.") else ALL))
    return top, per_layer


def extra_layers_ignored(num_layers: int, extra: int) -> tuple[str, ...]:
    """Regexes for HF tensors of layers past num_hidden_layers (DeepSeek's multi-token prediction)."""
    if not extra:
        return ()
    indices = "|".join(str(num_layers + i) for i in range(extra))
    return (rf"model\.layers\.({indices})\..+",)


def layer_spec_fn(config, vp_stage=None, use_transformer_engine=None):
    """megagsm's decoder block spec with transformer-engine checkpoint names on local layers."""
    from megagsm.layers.spec import HAVE_TE, decoder_block_spec
    from megagsm.layers.te_names import with_te_checkpoint_names

    use_te = HAVE_TE if use_transformer_engine is None else use_transformer_engine
    block = decoder_block_spec(config, use_transformer_engine=use_te, vp_stage=vp_stage)
    return block if use_te else with_te_checkpoint_names(block)
