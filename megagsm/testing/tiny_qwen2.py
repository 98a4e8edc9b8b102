"""Test-only bridge from a tiny random transformers Qwen2 model to a megatron GPTModel.

Stands in for the real converters (megagsm.models.families / provider) until they land: the
generation tests and benchmark need the *same* weights in both frameworks. Layout facts used
(shared/notes/megatron-on-cpu.md): fused QKV rows are grouped per KV group as
[the group's query heads; its key head; its value head] (bias alike); fc1 is [gate; up]. The
megatron side is addressed through layout-free keys (megagsm.runtime.sharded), so one full state
dict loads at any TP/PP layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megagsm.models.gpt import GPTArchitecture, build_gpt_model
from megagsm.runtime.sharded import load_full_state_dict


def tiny_qwen2_config(
    vocab_size=256, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=128, max_positions=512,
    rope_theta=10000.0, tie=False, eos_token_id=None, initializer_range=0.02,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        initializer_range=initializer_range, eos_token_id=eos_token_id, pad_token_id=0,
        attn_implementation="sdpa",
    )


def make_hf_model(hf_config, seed: int = 0):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config).eval()
    # random init leaves the QKV biases at zero; give them values so the bias layout is tested
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, hf_config.initializer_range)
    return model


def megatron_config(hf_config, tp: int = 1, pp: int = 1, params_dtype=torch.float32, **overrides):
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=hf_config.hidden_size // hf_config.num_attention_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def architecture(hf_config) -> GPTArchitecture:
    return GPTArchitecture(
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=hf_config.rope_parameters["rope_theta"],
        share_embeddings_and_output_weights=hf_config.tie_word_embeddings,
    )


def hf_to_megatron_state(hf_model) -> dict[str, torch.Tensor]:
    """Layout-free megatron keys (see gather_full_state_dict) from a transformers Qwen2 model."""
    cfg = hf_model.config
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    per_group = heads // groups

    def qkv(layer, kind):
        q = sd[f"model.layers.{layer}.self_attn.q_proj.{kind}"]
        k = sd[f"model.layers.{layer}.self_attn.k_proj.{kind}"]
        v = sd[f"model.layers.{layer}.self_attn.v_proj.{kind}"]
        q = q.reshape(groups, per_group * dim, *q.shape[1:])
        k = k.reshape(groups, dim, *k.shape[1:])
        v = v.reshape(groups, dim, *v.shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])

    layers = range(cfg.num_hidden_layers)
    pre = "decoder.layers."

    def stack(fn):
        return torch.stack([fn(i) for i in layers])

    out = {
        "embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        pre + "self_attention.linear_qkv.layer_norm_weight":
            stack(lambda i: sd[f"model.layers.{i}.input_layernorm.weight"]),
        pre + "self_attention.linear_qkv.weight": stack(lambda i: qkv(i, "weight")),
        pre + "self_attention.linear_qkv.bias": stack(lambda i: qkv(i, "bias")),
        pre + "self_attention.linear_proj.weight":
            stack(lambda i: sd[f"model.layers.{i}.self_attn.o_proj.weight"]),
        pre + "mlp.linear_fc1.layer_norm_weight":
            stack(lambda i: sd[f"model.layers.{i}.post_attention_layernorm.weight"]),
        pre + "mlp.linear_fc1.weight": stack(lambda i: torch.cat([
            sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]
        ])),
        pre + "mlp.linear_fc2.weight": stack(lambda i: sd[f"model.layers.{i}.mlp.down_proj.weight"]),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = sd["lm_head.weight"]
    return out


def build_megatron_from_hf(hf_model, params_dtype=torch.float32, parallel=None, **config_overrides):
    """This rank's GPTModel stage (runtime already initialised for `parallel`) holding hf_model's
    weights."""
    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.training import parallel_fields

    fields = parallel_fields(parallel or ParallelConfig())
    fields.pop("tensor_model_parallel_size")
    fields.pop("pipeline_model_parallel_size")
    cfg = megatron_config(
        hf_model.config,
        tp=(parallel or ParallelConfig()).tp,
        pp=(parallel or ParallelConfig()).pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        **fields,
        **config_overrides,
    )
    model = build_gpt_model(cfg, architecture(hf_model.config))
    full = hf_to_megatron_state(hf_model)
    load_full_state_dict([model], {k: v.to(params_dtype) for k, v in full.items()})
    return model.eval()


def char_tokenizer(vocab_size: int = 256):
    """A character-level PreTrainedTokenizerFast with `vocab_size` ids: 0 <pad>, 1 <eos>, then one
    character per id (printable ASCII first), so any id sequence decodes to text and back."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    chars += [chr(0x100 + i) for i in range(vocab_size - 2 - len(chars))]
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars[: vocab_size - 2])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
