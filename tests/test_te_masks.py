"""Attention masks transformer-engine honours, checked on CPU with a stand-in that treats masks as TE
documents (megagsm.testing.te_like_attention: `attention_mask` ignored unless the mask type includes
padding or is arbitrary), and `model.attention_backend`.

- Generation left-pads (or right-pads) prompts of different lengths and passes a key-padding mask:
  with the TE-like attention swapped into the layer spec, greedy completions must still equal
  transformers' own greedy generate of each prompt alone (no padding at all), also for refilled
  generation (right-padded prefill, per-row decoding under an arbitrary mask). The same launch runs
  the mask types generation passed before (causal prefill, no_mask decode): the TE-like model then
  attends to pad tokens and parity breaks, which is what this test exists to catch.
- SFT packing feeds packed rows as THD documents (megagsm.sft.data.packed_microbatch): under megagsm's
  SDPA attention and under the TE-like one each packed document gets the per-token losses it has
  alone (the truth: each document run by itself). The dense per-document mask it replaced is ignored
  under TE's rules (documents see each other), which the TE-like attention must show.
- THD packing (GSPO's microbatches): one forward of sequences packed with `packed_seq_params` gives
  each sequence the logits it has alone, for dense, Gemma and MLA families, with SDPA and TE-like
  attention (which also holds the THD input to TE's asserts: int32 cu_seqlens, shapes, max_seqlen).
"""
import contextlib

import pytest
import torch

from megagsm.testing.multirank import run_ranks

LP_ATOL = 2e-5     # as tests/test_generation.py
LOSS_ATOL = 1e-5   # fp32, per-token losses of magnitude ~5 from differently shaped attention


def _documents():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 256, (n,), generator=g) for n in (6, 9, 5)]


def _per_document_losses(model, mode: str) -> list[torch.Tensor]:
    """Per-token losses of each document: run alone (the truth), or packed into one row fed as THD
    documents ("thd") or with the dense per-document mask ("dense")."""
    from megagsm.data.packing import pack_samples
    from megagsm.sft.data import packed_microbatch
    from megagsm.testing.dense_document_mask import dense_mask_microbatch

    samples = [{"input_ids": d[:-1], "labels": d[1:], "loss_mask": torch.ones(len(d) - 1)} for d in _documents()]
    with torch.no_grad():
        if mode == "alone":
            return [model(s["input_ids"][None], torch.arange(len(s["input_ids"]))[None], None,
                          labels=s["labels"][None])[0] for s in samples]
        rows = pack_samples(samples, seq_length=24, pad_id=0)
        assert len(rows) == 1
        b = packed_microbatch(rows) if mode == "thd" else dense_mask_microbatch(rows)
        packed = {"packed_seq_params": b["packed_seq_params"]} if mode == "thd" else {}
        loss = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"], **packed)[0]
    out, start = [], 0
    for s in samples:
        n = len(s["input_ids"])
        out.append(loss[start:start + n])
        start += n
    return out


THD_FAMILIES = ("qwen2", "gemma", "deepseek_v2", "deepseek_v3")  # dense, (1+w) norms, MLA + YaRN + MoE
THD_ATOL = 1e-6


def _thd_errors(families) -> dict:
    """Per family (random weights, fp32): max |logit| difference between one THD forward of four
    sequences packed with a padding tail and a forward of each sequence alone (the truth); with the
    TE-like attention too for the dense family."""
    from megagsm.config.parallel import ParallelConfig
    from megagsm.models.packed_seq import document_positions, thd_params
    from megagsm.models.provider import build_model_from_hf_config
    from megagsm.testing.te_like_attention import te_like_spec
    from megagsm.testing.tiny_hf import tiny_config
    from megagsm.testing.tiny_moe import MOE_CASES

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 250, (n,), generator=g) for n in (7, 3, 12, 1)]
    docs = [len(s) for s in seqs] + [9]
    tokens = torch.cat(seqs + [torch.zeros(9, dtype=torch.long)])[None]
    out = {}
    for name in (*families, "qwen2_te_like"):
        family = name.removesuffix("_te_like")
        model_type, over = MOE_CASES.get(family, (family, {}))
        torch.manual_seed(0)
        with te_like_spec() if name.endswith("_te_like") else contextlib.nullcontext():
            model = build_model_from_hf_config(tiny_config(model_type, **over).to_dict(), ParallelConfig())[0]
        model.eval()
        with torch.no_grad():
            packed = model(tokens, document_positions(docs)[None], None, packed_seq_params=thd_params(docs))[0]
            alone = torch.cat([model(s[None], torch.arange(len(s))[None], None)[0] for s in seqs])
        out[name] = (packed[:len(alone)] - alone).abs().max().item()
        if not name.endswith("_te_like"):
            out[f"{name}_shared"] = _shared_prompt_error(model, g)
    return out


def _shared_prompt_error(model, g) -> float:
    """Max |logit| difference between one THD forward of a prompt laid out once with three responses
    continuing it (thd_params' prefix_of, as GSPO's shared prompts pack them) and a forward of the
    prompt + each response alone."""
    from megagsm.models.packed_seq import document_positions, thd_params

    prompt = torch.randint(1, 250, (6,), generator=g)
    responses = [torch.randint(1, 250, (n,), generator=g) for n in (4, 1, 7)]
    docs, prefix_of = [6, 4, 1, 7, 5], [-1, 0, 0, 0, -1]
    tokens = torch.cat([prompt, *responses, torch.zeros(5, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(tokens, document_positions(docs, prefix_of)[None], None,
                       packed_seq_params=thd_params(docs, prefix_of=prefix_of))[0]
        errors, start = [], 6
        for r in responses:
            alone = model(torch.cat([prompt, r])[None], torch.arange(6 + len(r))[None], None)[0]
            errors.append((packed[:6] - alone[:6]).abs().max())
            errors.append((packed[start:start + len(r)] - alone[6:]).abs().max())
            start += len(r)
    return max(errors).item()


def _launch(work_dir):
    from functools import partial

    from megagsm.config.parallel import ParallelConfig
    from megagsm.generation import SamplingParams, generate_refilled
    from megagsm.generation import generate as engine_generate
    from megagsm.generation import rope_cache
    from megagsm.layers import spec
    from megagsm.layers.attention import SDPAttention
    from megagsm.models.provider import build_model_from_hf_config, load_hf_config
    from megagsm.runtime import init_runtime
    from megagsm.testing import generation_cases as cases
    from megagsm.testing.te_like_attention import TELikeAttention, te_like_spec
    from megagsm.testing.tiny_qwen2 import char_tokenizer, convert, load_converted

    init_runtime(ParallelConfig())
    out = {}
    hf = cases.dense_hf()
    prompts = cases.prompts()
    out["hf"] = cases.hf_greedy(hf, prompts)
    mcore = convert(hf, char_tokenizer(256), work_dir, name="dense")
    greedy = SamplingParams(max_new_tokens=cases.MAX_NEW, greedy=True)

    with te_like_spec():
        model, vocab = load_converted(mcore, ParallelConfig())
    out["te_like_classes"] = sorted(c.__name__ for c in spec.core_attention_classes([model]))
    generate = partial(engine_generate, vocab_limit=vocab)
    for side in ("left", "right"):
        r = generate(model, prompts, greedy, padding_side=side)
        out[f"te_like_{side}"] = r.completions()
        out[f"te_like_{side}_lp_err"] = cases.forward_logprobs(model, prompts, r, vocab)
        out[f"te_like_{side}_chunked"] = generate(model, prompts, greedy, padding_side=side,
                                                  max_prefill_tokens=2 * 13).completions()
    # refilled: right-padded causal prefill, per-row decoding with an arbitrary mask (eager and static)
    for name, graphs in (("te_like_refill", False), ("te_like_refill_static", True)):
        out[name] = generate_refilled(model, prompts, greedy, vocab_limit=vocab, max_batch_size=2,
                                      cuda_graphs=graphs).completions()
    fixed = rope_cache.generation_mask_type
    rope_cache.generation_mask_type = lambda cache, prefill: (
        rope_cache.AttnMaskType.causal if prefill else rope_cache.AttnMaskType.no_mask)
    try:  # the mask types generation passed before
        out["te_like_old_mask_types"] = generate(model, prompts, greedy).completions()
    finally:
        rope_cache.generation_mask_type = fixed

    # packing: the TE-like model vs megagsm's SDPA attention, against each document alone
    sdpa_model, _ = load_converted(mcore, ParallelConfig())
    for name, m in (("sdpa", sdpa_model), ("te_like", model)):
        alone = _per_document_losses(m, "alone")
        for mode in ("thd", "dense"):
            packed = _per_document_losses(m, mode)
            out[f"{name}_{mode}_packed_err"] = max((a - p).abs().max().item() for a, p in zip(alone, packed))

    # model.attention_backend where the spec is built: sdpa even when TE is installed
    hf_config = load_hf_config(mcore)
    saved = spec.HAVE_TE
    spec.HAVE_TE = True
    try:
        out["sdpa_with_te_installed"] = sorted(
            c.__name__ for c in spec.core_attention_classes(
                build_model_from_hf_config(hf_config, ParallelConfig(), attention_backend="sdpa")))
        out["auto_with_te_installed_uses_te"] = spec.use_transformer_engine("auto")
    finally:
        spec.HAVE_TE = saved
    out["names"] = (SDPAttention.__name__, TELikeAttention.__name__)
    out["thd"] = _thd_errors(THD_FAMILIES)
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    [out] = run_ranks(_launch, 1, str(tmp_path_factory.mktemp("te_masks")))
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_parity_with_te_mask_rules(launch, side):
    assert launch["te_like_classes"] == ["TELikeAttention"]
    assert launch[f"te_like_{side}"] == launch["hf"]
    assert launch[f"te_like_{side}_chunked"] == launch["hf"]
    assert launch[f"te_like_{side}_lp_err"] < LP_ATOL
    assert launch["te_like_refill"] == launch["te_like_refill_static"] == launch["hf"]


@pytest.mark.multirank
def test_the_old_mask_types_break_parity_under_te_rules(launch):
    assert launch["te_like_old_mask_types"] != launch["hf"]


@pytest.mark.multirank
def test_packed_sft_losses_equal_unpacked_under_sdpa_and_te_rules(launch):
    assert launch["sdpa_thd_packed_err"] < LOSS_ATOL
    assert launch["te_like_thd_packed_err"] < LOSS_ATOL
    assert launch["sdpa_dense_packed_err"] < LOSS_ATOL
    # under TE's rules a dense document mask is ignored (documents see each other): why SFT packs as THD
    assert launch["te_like_dense_packed_err"] > 1e-3


@pytest.mark.multirank
def test_one_thd_forward_of_packed_sequences_equals_each_sequence_alone(launch):
    """GSPO's packed microbatches (megagsm.rl.packing) rely on it: per-document attention and RoPE
    positions restarting per sequence, for dense, Gemma and MLA (DeepSeek V2/V3) models, under
    megagsm's SDPA attention and under TE's THD rules; and (`_shared`, SDPA) a shared prompt laid out
    once gives each continuation the logits of prompt + response alone."""
    assert set(launch["thd"]) == {*THD_FAMILIES, *(f"{f}_shared" for f in THD_FAMILIES), "qwen2_te_like"}
    for family, err in launch["thd"].items():
        assert err < THD_ATOL, (family, err)


@pytest.mark.multirank
def test_attention_backend_sdpa_even_with_te_installed(launch):
    assert launch["sdpa_with_te_installed"] == ["SDPAttention"]
    assert launch["auto_with_te_installed_uses_te"] is True


def test_attention_backend_te_without_te_is_a_user_error(monkeypatch):
    from megagsm.errors import UserError
    from megagsm.layers import spec

    monkeypatch.setattr(spec, "HAVE_TE", False)
    with pytest.raises(UserError, match=r"model.attention_backend=te: transformer-engine is not installed"):
        spec.use_transformer_engine("te")
    with pytest.raises(UserError, match=r"model.attention_backend='flash'"):
        spec.use_transformer_engine("flash")
    assert spec.use_transformer_engine("auto") is False
    assert spec.use_transformer_engine("sdpa") is False
    assert spec.use_transformer_engine("local") is False
