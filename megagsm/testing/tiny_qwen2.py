"""Tiny random transformers models taken through megagsm's real converter, for the generation tests
and benchmark: the same weights in transformers and in a megatron GPTModel at any layout.

    hf = make_hf_model(tiny_qwen2_config())
    mcore_dir = convert(hf, char_tokenizer(), work_dir)        # HF save + hf-to-mcore (collective)
    model, vocab = load_converted(mcore_dir)                    # provider build + torch_dist load
    generate(model, prompts, params, vocab_limit=vocab)         # logits past `vocab` are padding
"""
from __future__ import annotations

from pathlib import Path

import torch

from megagsm.config.parallel import ParallelConfig


def tiny_qwen2_config(
    vocab_size=256, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=128, max_positions=512,
    rope_theta=10000.0, tie=False, initializer_range=0.02,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        initializer_range=initializer_range, pad_token_id=0, attn_implementation="sdpa",
    )


def make_hf_model(hf_config, seed: int = 0):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config).eval()
    # random init leaves the QKV biases at zero; give them values so the bias layout is exercised
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, hf_config.initializer_range)
    return model


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


def convert(hf_model, tokenizer, work_dir, parallel: ParallelConfig | None = None,
            name: str = "model") -> Path:
    """Saves hf_model (+ tokenizer) to work_dir/name-hf and converts it with megagsm's hf-to-mcore
    into work_dir/name-mcore (layout-free: loads at any TP/PP/EP). Collective once the runtime is up."""
    import torch.distributed as dist

    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from megagsm.runtime.collectives import barrier

    work_dir = Path(work_dir)
    hf_dir, mcore_dir = work_dir / f"{name}-hf", work_dir / f"{name}-mcore"
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf_model.save_pretrained(str(hf_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(hf_dir))
    if dist.is_initialized():
        barrier()
    convert_hf_to_mcore(hf_dir, mcore_dir, parallel or ParallelConfig(), progress=False)
    return mcore_dir


def load_converted(mcore_dir, parallel: ParallelConfig | None = None, dtype=torch.float32):
    """(this rank's GPTModel stage holding the converted weights, the real vocabulary size)."""
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config, provider_for

    hf_config = load_hf_config(mcore_dir)
    chunks = build_model_from_hf_config(hf_config, parallel, dtype)
    load_mcore_checkpoint(chunks, mcore_dir)
    return chunks[0].eval(), provider_for(hf_config).vocab_size
