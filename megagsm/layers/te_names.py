"""Checkpoint names of local-spec layers, made identical to the transformer-engine spec's.

megatron's torch_dist checkpoints name tensors after the modules that hold them, and the two specs
hold norms in different modules: with transformer-engine a norm is often fused into the next linear
(`self_attention.linear_qkv.layer_norm_weight`), in the local spec it is a module of its own
(`input_layernorm.weight`). megatron's local spec maps its names onto TE's only for dense layers with
standard attention, and wrongly so for MoE layers (TE keeps `pre_mlp_layernorm` there). This sets each
local layer's `sharded_state_dict_keys_map` to exactly what TE stores, so a checkpoint (and one HF
mapping table) serves both specs:

| layer part                     | TE checkpoint name                                   |
|--------------------------------|------------------------------------------------------|
| input norm, standard attention | self_attention.linear_qkv.layer_norm_weight          |
| input norm, MLA                | input_layernorm.weight                               |
| MLA q / kv latent norms        | self_attention.linear_{q,kv}_up_proj.layer_norm_weight |
| pre-MLP norm, dense MLP        | mlp.linear_fc1.layer_norm_weight                     |
| pre-MLP norm, MoE              | pre_mlp_layernorm.weight                             |
"""
from __future__ import annotations

import dataclasses

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


def _module(spec):
    return spec.module if isinstance(spec, ModuleSpec) else spec


def te_keys_map(layer_spec: ModuleSpec) -> dict[str, str]:
    """The local-spec -> TE checkpoint prefix map for one decoder layer spec."""
    sub = layer_spec.submodules
    attention, mlp = _module(sub.self_attention), _module(sub.mlp)
    keys = {}
    if isinstance(attention, type) and issubclass(attention, MLASelfAttention):
        keys["self_attention.q_layernorm."] = "self_attention.linear_q_up_proj.layer_norm_"
        keys["self_attention.kv_layernorm."] = "self_attention.linear_kv_up_proj.layer_norm_"
    else:
        keys["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
    if not (isinstance(mlp, type) and issubclass(mlp, MoELayer)):
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return keys


def with_te_checkpoint_names(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """A local-spec block whose layers save and load under transformer-engine names. Only for local
    specs: TE layers already use them."""
    layers = []
    for spec in block.layer_specs:
        sub = dataclasses.replace(spec.submodules, sharded_state_dict_keys_map=te_keys_map(spec))
        layers.append(dataclasses.replace(spec, submodules=sub))
    return dataclasses.replace(block, layer_specs=layers)
