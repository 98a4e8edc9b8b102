"""Layer specs: megatron's own GPT decoder block spec, with megagsm's norm and attention swapped in
where transformer-engine is absent (TE's modules are used untouched when it is installed)."""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.layers.attention import SDPAttention
from megagsm.layers.norm import Norm

try:  # pragma: no cover - only on machines with transformer-engine
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except Exception:
    HAVE_TE = False

_LOCAL_NORMS = {WrappedTorchNorm}
try:  # apex's fused norm is megatron's local choice when apex is installed
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    _LOCAL_NORMS.add(FusedLayerNorm)
except Exception:  # pragma: no cover
    pass

_REPLACEMENTS = {DotProductAttention: SDPAttention, **{n: Norm for n in _LOCAL_NORMS}}


def _swap(obj):
    """Returns obj with local norm/attention classes replaced, recursing through specs."""
    if isinstance(obj, type):
        return _REPLACEMENTS.get(obj, obj)
    if isinstance(obj, ModuleSpec):
        return dataclasses.replace(
            obj, module=_swap(obj.module), submodules=_swap(obj.submodules)
        )
    if isinstance(obj, TransformerBlockSubmodules):
        return TransformerBlockSubmodules(
            layer_specs=[_swap(s) for s in obj.layer_specs], layer_norm=_swap(obj.layer_norm)
        )
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _swap(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def decoder_block_spec(
    config: TransformerConfig,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The decoder block spec for the layers this pipeline stage builds (dense, MoE or MLA layers,
    as `config` says)."""
    use_te = HAVE_TE if use_transformer_engine is None else use_transformer_engine
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return spec if use_te else _swap(spec)
