"""Model providers: an HF config.json -> a megatron GPTModel per pipeline stage, and megatron
checkpoints made self-describing (they carry the HF config and tokenizer files).

Trainers use:
    hf = load_hf_config(path)                       # HF model dir or megagsm checkpoint dir
    chunks = build_model_from_hf_config(hf, parallel, torch.bfloat16)
    load_mcore_checkpoint(chunks, ckpt_dir)          # megagsm.checkpoint.model_weights
    tokenizer = load_tokenizer(ckpt_dir)
Logits come out over the padded vocabulary (a multiple of 128 * tp, as megatron pads); only the
first `provider.vocab_size` columns are real: slice them off before softmax/argmax/sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

import megagsm.runtime  # noqa: F401  (first: it silences megatron's import-time TE/apex warnings)
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megagsm.config.layout import divisibility_rules
from megagsm.config.parallel import ParallelConfig
from megagsm.models.errors import ModelInputError
from megagsm.models.families.base import Family, ModelSettings
from megagsm.layers.spec import decoder_block_spec, use_transformer_engine
from megagsm.layers.swiglu import fused_activation_fields
from megagsm.models.gpt import GPTArchitecture, build_model_chunks
from megagsm.models.hf_config import hf_files_dir, load_hf_config  # noqa: F401  (part of the API)
from megagsm.models.mapping import Dims, WeightMap
from megagsm.models.registry import family_for
from megagsm.models.training import parallel_fields

VOCAB_DIVISIBLE_BY = 128               # megatron-LM's make_vocab_size_divisible_by default

# megatron field -> the HF config.json field it came from, for error messages
_HF_FIELD = {
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
}


def load_tokenizer(path):
    """The HF tokenizer saved with an HF model dir or inside a megagsm checkpoint dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_files_dir(path)), trust_remote_code=False)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """megatron-LM's rule: round up to a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelProvider:
    hf_config: dict
    family: Family
    settings: ModelSettings
    weight_map: WeightMap

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def vocab_size(self) -> int:
        """The real (HF) vocabulary size; megatron's embedding and logits are padded beyond it."""
        return self.settings.arch.vocab_size

    @property
    def num_layers(self) -> int:
        return self.settings.config["num_layers"]

    def dims(self) -> Dims:
        c = self.settings.config
        return Dims(c["num_attention_heads"], c["num_query_groups"], c["kv_channels"])

    def check_layout(self, parallel: ParallelConfig) -> None:
        """Raises ModelInputError naming the config field a TP/PP/EP layout cannot split."""
        c = self.settings.config
        for what, size, name, total in divisibility_rules(parallel, c["num_layers"], c["num_attention_heads"],
                                                          c["num_query_groups"], c["ffn_hidden_size"], None):
            if total % size:
                raise ModelInputError(f"layout: {_HF_FIELD.get(name, name)}={total} is not divisible by "
                                      f"{_HF_FIELD.get(what, what)}={size}")
        if parallel.ep != 1 and not self.family.is_moe:
            raise ModelInputError(f"layout: ep={parallel.ep} but model_type {self.model_type!r} has no experts")
        if self.family.check_layout is not None:
            self.family.check_layout(c, parallel)

    def transformer_config(
        self, parallel: ParallelConfig, dtype: torch.dtype = torch.float32, **overrides
    ) -> TransformerConfig:
        """overrides: any TransformerConfig field (dropout, recompute, ...), applied last."""
        self.check_layout(parallel)
        kwargs = dict(
            self.settings.config,
            **fused_activation_fields(self.settings.config),
            **parallel_fields(parallel),
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        kwargs.update(overrides)
        # multi-latent attention (DeepSeek V2/V3) has its own config class for its extra fields
        cls = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
        return cls(**kwargs)

    def architecture(self, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> GPTArchitecture:
        arch = self.settings.arch
        return replace(arch, vocab_size=padded_vocab_size(arch.vocab_size, tp, divisible_by))

    def build(
        self,
        parallel: ParallelConfig | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        meta: bool = False,
        vocab_divisible_by: int = VOCAB_DIVISIBLE_BY,
        attention_backend: str = "auto",
        **overrides,
    ) -> list:
        """This rank's model chunks. The runtime (init_runtime) must be up with the same layout.
        meta=True builds parameters on the meta device (shapes and sharding only, no memory), always
        with the local layer spec: its checkpoint keys are transformer-engine's, and TE modules would
        allocate real device memory. attention_backend: model.attention_backend (auto|te|sdpa|local)."""
        parallel = parallel or current_parallel_config()
        _check_runtime_matches(parallel)
        if meta:
            overrides = {**overrides, "use_cpu_initialization": True, "perform_initialization": False,
                         "init_model_with_meta_device": True}
        config = self.transformer_config(parallel, dtype, **overrides)
        arch = self.architecture(parallel.tp, vocab_divisible_by)
        spec_fn = partial(self.family.layer_spec_fn or decoder_block_spec,
                          use_transformer_engine=False if meta else use_transformer_engine(attention_backend))
        with torch.device("meta") if meta else _nullcontext():
            chunks = build_model_chunks(config, arch, spec_fn)
        if self.family.post_build is not None:
            for chunk in chunks:
                self.family.post_build(chunk, self.hf_config)
        return chunks


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def current_parallel_config() -> ParallelConfig:
    """The layout the runtime was initialised with (sizes only)."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    return ParallelConfig(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        vpp=vpp if vpp and vpp > 1 else None,
    )


def _check_runtime_matches(parallel: ParallelConfig) -> None:
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("init_runtime(parallel) must run before building a model")
    live = current_parallel_config()
    for name in ("tp", "pp", "ep", "cp"):
        if getattr(live, name) != getattr(parallel, name):
            raise ValueError(
                f"parallel.{name}={getattr(parallel, name)} but the runtime was initialised with "
                f"{name}={getattr(live, name)}"
            )


def provider_for(hf_config: dict) -> ModelProvider:
    """The provider for an HF config dict (see load_hf_config); raises ModelInputError for unknown
    model types or unsupported config values."""
    family = family_for(hf_config.get("model_type"))
    return ModelProvider(
        hf_config=hf_config,
        family=family,
        settings=family.settings(hf_config),
        weight_map=family.weights(hf_config),
    )


def build_model_from_hf_config(
    hf_config: dict, parallel: ParallelConfig | None = None, dtype: torch.dtype = torch.float32,
    **overrides,
) -> list:
    """This rank's GPTModel chunks (one per virtual pipeline stage) for an HF config. Weights are
    randomly initialised: load them with megagsm.checkpoint.model_weights.load_mcore_checkpoint."""
    return provider_for(hf_config).build(parallel, dtype, **overrides)
