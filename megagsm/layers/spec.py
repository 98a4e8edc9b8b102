"""Layer specs: megatron's own GPT decoder block spec, with megagsm's norm and attention swapped in
where transformer-engine is not used (TE's modules are used untouched when it is).

`model.attention_backend` picks the spec: auto (TE when installed, else the local spec with megagsm's
SDPA attention), te (TE, refused when it is not installed), sdpa / local (the local spec with SDPA
attention even when TE is installed; megatron's own local DotProductAttention is never used: with a
causal mask type it drops the causal part of any attention_mask it is given, and generation passes a
key-padding mask)."""
from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.config.errors import ConfigError
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


ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")


def use_transformer_engine(attention_backend: str = "auto") -> bool:
    """Whether `model.attention_backend` selects transformer-engine's layers."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention_backend={attention_backend!r}: choose one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    if attention_backend == "te" and not HAVE_TE:
        raise ConfigError("model.attention_backend=te: transformer-engine is not installed (install it, "
                          "or use model.attention_backend=auto|sdpa)")
    return HAVE_TE if attention_backend == "auto" else attention_backend == "te"


def core_attention_classes(model_chunks) -> set[type]:
    """The core attention classes the built model's attention layers use."""
    from megatron.core.transformer.attention import Attention

    return {type(m.core_attention) for chunk in model_chunks for m in chunk.modules()
            if isinstance(m, Attention) and hasattr(m, "core_attention")}


def decoder_block_spec(
    config: TransformerConfig,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The decoder block spec for the layers this pipeline stage builds (dense, MoE or MLA layers,
    as `config` says). use_transformer_engine: None is model.attention_backend=auto."""
    use_te = HAVE_TE if use_transformer_engine is None else use_transformer_engine
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return spec if use_te else _swap(spec)
