"""Builds a megatron GPTModel for this rank's pipeline stage from a TransformerConfig."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.layers.spec import decoder_block_spec


@dataclass
class GPTArchitecture:
    """The GPTModel arguments that are not part of TransformerConfig (named as GPTModel names them)."""

    vocab_size: int
    max_sequence_length: int
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    seq_len_interpolation_factor: float | None = None
    share_embeddings_and_output_weights: bool = False
    rope_scaling: bool = False          # Llama-3 style frequency scaling (megatron's fixed 1/4/8192 recipe)
    rope_scaling_factor: float = 8.0


def build_gpt_model(
    config: TransformerConfig,
    arch: GPTArchitecture,
    vp_stage: int | None = None,
    layer_spec_fn=decoder_block_spec,
) -> GPTModel:
    """layer_spec_fn(config, vp_stage=...) -> block spec; model families with layer tweaks pass their own."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec_fn(config, vp_stage=vp_stage),
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **asdict(arch),  # its fields are GPTModel's argument names
    )


def build_model_chunks(
    config: TransformerConfig, arch: GPTArchitecture, layer_spec_fn=decoder_block_spec
) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one without interleaving)."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [build_gpt_model(config, arch, layer_spec_fn=layer_spec_fn)]
    return [build_gpt_model(config, arch, vp_stage=i, layer_spec_fn=layer_spec_fn) for i in range(vpp)]


def unwrap_model(model) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers (one chunk, not a list)."""
    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise TypeError(f"expected a (wrapped) megatron GPTModel, got {type(model).__name__}")
        inner = inner.module
    return inner
