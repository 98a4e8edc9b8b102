"""Which model to build and how: from a Hugging Face directory, or random weights for tiny runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megagsm.config.moe import MoEConfig

# Size fields a random-init model needs when there is no hf_dir to read them from.
REQUIRED_RANDOM_SIZES = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size")


@dataclass
class ModelConfig:
    # hf: architecture and weights from hf_dir. random: architecture from hf_dir's config.json
    # when given, otherwise from the size fields below; weights freshly initialised (seed: train.seed).
    init: Literal["hf", "random"] = "hf"
    hf_dir: str | None = None       # HF model dir (config.json, tokenizer, *.safetensors)
    load: str | None = None         # megatron dist checkpoint whose weights replace the above
    tokenizer: str | None = None    # tokenizer dir; None: hf_dir
    family: str | None = None       # architecture family override (e.g. "qwen2"); None: config.json model_type
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: transformer-engine when installed, else the project's SDPA core attention; te: TE (an
    # error when it is not installed); sdpa / local: the local spec with SDPA attention, even with TE.
    attention_backend: Literal["auto", "sdpa", "local", "te"] = "auto"
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation

    # Sizes. None: read from hf_dir's config.json. Setting one is only allowed with init=random.
    hidden_size: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None   # KV heads; None: num_attention_heads
    kv_channels: int | None = None        # head dim; None: hidden_size // num_attention_heads
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    num_experts: int | None = None        # MoE experts; None: dense
    moe_router_topk: int | None = None
    tie_word_embeddings: bool | None = None
    # training-time knobs of MoE models (load balancing, dispatcher, capacity); ignored for dense ones
    moe: MoEConfig = field(default_factory=MoEConfig)

    def explicit_sizes(self) -> dict[str, int | bool]:
        """The size fields the user set (non-None), by name."""
        names = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "kv_channels",
                 "ffn_hidden_size", "vocab_size", "max_position_embeddings", "num_experts",
                 "moe_router_topk", "tie_word_embeddings")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
