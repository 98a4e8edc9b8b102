"""Converter and model families against transformers where only bf16 or a bad file shows a bug.

* Gemma scales its embeddings by sqrt(hidden) rounded to the embedding dtype first: in bf16
  sqrt(72) = 8.485 becomes 8.5 (0.18% larger). All fp32 tests are blind to the rounding, so the
  embedding output (the input of the first decoder layer) is compared bit for bit with the one
  transformers' GemmaModel computes in bf16 (captured with a hook, not recomputed here).
* bf16 logits of Qwen2 and Gemma against transformers. Tolerance: both run the same bf16 weights
  with bf16 activations but different kernels (fused QKV, SDPA vs eager, reduction orders), so each
  differs from the fp32 truth by bf16 rounding noise. The bound is relative to transformers' own
  bf16 error: megatron's bf16 logits must be within 2x transformers' bf16 distance to the fp32 logits
  (plus 1e-3). A wrong mapping, norm or scale moves logits by O(0.1..1), far above that noise.
* A tied model (tie_word_embeddings) whose lm_head.weight on disk differs from embed_tokens must be
  refused by the converter, naming the file and tensor (megatron has one tensor for both).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from megagsm.testing.multirank import run_ranks
from megagsm.testing.tiny_hf import make_tiny_hf_model

pytestmark = pytest.mark.multirank

VOCAB = 300
GEMMA = dict(hidden_size=72, head_dim=24, intermediate_size=96)  # sqrt(72) is not a bf16 number


def _tokens():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _hf_reference(model, tokens):
    """fp32 and bf16 logits, and the bf16 input of the first decoder layer (the scaled embedding)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embedding"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    with torch.no_grad():
        fp32 = model(tokens).logits.float()
        model.to(torch.bfloat16)
        handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        bf16 = model(tokens).logits.float()
        handle.remove()
    return {"fp32": fp32, "bf16": bf16, "embedding": captured["embedding"]}


def _megatron(cases, tokens, bad_tied_dir, bad_tied_out):
    from megagsm.checkpoint.hf_to_mcore import convert_hf_to_mcore
    from megagsm.config.parallel import ParallelConfig
    from megagsm.errors import UserError
    from megagsm.models.forward import forward_logits
    from megagsm.checkpoint.model_weights import load_mcore_checkpoint
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config
    from megagsm.runtime import init_runtime

    parallel = ParallelConfig()
    init_runtime(parallel)
    out = {}
    for name, hf_dir, ckpt in cases:
        convert_hf_to_mcore(hf_dir, ckpt, parallel, progress=False)
        chunks = build_model_from_hf_config(load_hf_config(ckpt), parallel, dtype=torch.bfloat16)
        load_mcore_checkpoint(chunks, ckpt)
        model = chunks[0].eval()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            embedding = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        out[name] = {"logits": forward_logits(chunks, tokens, VOCAB),
                     "embedding": embedding.transpose(0, 1).contiguous(),
                     "dtype": str(next(model.parameters()).dtype)}
    try:
        convert_hf_to_mcore(bad_tied_dir, bad_tied_out, parallel, progress=False)
        out["bad_tied_error"] = None
    except UserError as e:
        out["bad_tied_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_truths")
    tokens = _tokens()
    refs, cases = {}, []
    for name, model_type, overrides in (("qwen2", "qwen2", {}), ("gemma", "gemma", GEMMA)):
        model = make_tiny_hf_model(model_type, root / name, **overrides)
        refs[name] = _hf_reference(model, tokens)
        cases.append((name, str(root / name), str(root / f"{name}.mcore")))
    # a tied Qwen2 whose lm_head.weight on disk is not the embedding
    bad = root / "bad_tied"
    make_tiny_hf_model("qwen2", bad, tie_word_embeddings=True)
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 0.01
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = run_ranks(_megatron, 1, cases, tokens, str(bad), str(root / "bad_tied.mcore"))[0]
    return refs, out, root


def test_gemma_bf16_embedding_scale_is_rounded_like_transformers(results):
    refs, out, _ = results
    ref, got = refs["gemma"]["embedding"], out["gemma"]["embedding"]
    assert out["gemma"]["dtype"] == "torch.bfloat16" and ref.dtype == got.dtype == torch.bfloat16
    # the check can fail: the unrounded scale gives a different bf16 embedding for this hidden size
    raw = torch.nn.functional.embedding(_tokens(), torch.from_numpy(
        load_file(results[2] / "gemma" / "model.safetensors")["model.embed_tokens.weight"].numpy()
    ).to(torch.bfloat16))
    assert not torch.equal(raw * (72 ** 0.5), ref)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["qwen2", "gemma"])
def test_bf16_logits_match_transformers(results, name):
    refs, out, _ = results
    ref = refs[name]
    hf_error = (ref["bf16"] - ref["fp32"]).abs().max().item()
    ours_error = (out[name]["logits"] - ref["fp32"]).abs().max().item()
    assert hf_error > 0  # bf16 really ran
    assert ours_error <= 2 * hf_error + 1e-3, (ours_error, hf_error)
    assert (out[name]["logits"] - ref["bf16"]).abs().max().item() <= 3 * hf_error + 1e-3


def test_tied_model_with_a_different_lm_head_is_refused(results):
    _, out, root = results
    error = out["bad_tied_error"]
    assert error is not None, "the converter accepted a tied model whose lm_head differs from embed_tokens"
    assert "lm_head.weight" in error and "model.embed_tokens.weight" in error and "model.safetensors" in error
    assert not (root / "bad_tied.mcore").exists()  # nothing half-written
