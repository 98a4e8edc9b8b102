"""Small truths computed by hand that `make mutate` runs found unchecked: GSPO's default advantages
are (r - mean) / (unbiased std + 1e-6) (Python's statistics module as the reference, and a group whose
std is comparable to eps); the SFT row builder's edges (EOS appended by default, the tokenizer's own
pad id, the smallest sequence length, the last token budgets that still fit, conversation truncation
and next-token labels); the edges of the MoE config checks; the sampler's data order as a stable
function of (seed, epoch); the chunked loss's chunk size; the token sampler's defaults and its
top-k at the vocabulary size."""
import statistics
from types import SimpleNamespace

import pytest
import torch

from megagsm.data.sft_dataset import SequenceTooLongError, SFTDataset, _pad_id, truncate_prompt_response
from megagsm.rl.batching import Rollouts, compute_advantages


def _rollouts(rewards, group_size):
    n = len(rewards)
    return Rollouts([[1]] * n, [[5]] * n, torch.tensor(rewards), [0] * n, group_size)


def test_default_advantages_are_std_normalised_by_hand():
    groups = [[0.0, 1.0, 1.0, 0.5], [0.0, 0.0, 1e-5, 0.0]]  # the second: std ~ 5e-6, comparable to eps
    adv = compute_advantages(_rollouts([r for g in groups for r in g], 4))
    want = [(r - statistics.mean(g)) / (statistics.stdev(g) + 1e-6) for g in groups for r in g]
    torch.testing.assert_close(adv.values, torch.tensor(want), rtol=1e-4, atol=1e-6)
    assert adv.keep.all()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from megagsm.testing.tiny_hf import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def test_rows_end_with_eos_and_pad_with_the_pad_id(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    data = SFTDataset([("w10 w11", "w12 w13")], tokenizer, 64)
    sample = data[0]
    assert sample["labels"][-1].item() == tokenizer.eos_token_id and sample["loss_mask"][-1] == 1
    assert data.pad_id == tokenizer.pad_token_id
    assert _pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7


def test_smallest_sequence_length_is_two(tokenizer):
    assert len(SFTDataset([], tokenizer, 2)) == 0
    with pytest.raises(ValueError, match="seq_length must be >= 2"):
        SFTDataset([], tokenizer, 1)


def test_truncation_budgets_at_the_edge():
    prompt, response = [10, 11, 12], [20, 21, 22]
    # left, no BOS: one prompt token before the response is the least that fits
    assert truncate_prompt_response(prompt, response, 4, "left") == ([12], response)
    with pytest.raises(SequenceTooLongError, match="response alone"):
        truncate_prompt_response(prompt, response, 3, "left")
    # left with a BOS: the BOS alone is that token
    assert truncate_prompt_response([1, *prompt], response, 4, "left", bos_id=1) == ([1], response)
    # right: one response token kept is still a trainable row
    assert truncate_prompt_response(prompt, response, 4, "right") == (prompt, [20])
    with pytest.raises(SequenceTooLongError, match="prompt alone"):
        truncate_prompt_response(prompt, response, 3, "right")


LLAMA_MINIMAL = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96,
                 "vocab_size": 300, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}


def test_llama_config_defaults_are_transformers_defaults():
    """A config.json that omits rope_theta / tie_word_embeddings means transformers' defaults:
    LlamaConfig's rope_theta 10000 and untied embeddings (Gemma: tied)."""
    from megagsm.models.registry import family_for

    arch = family_for("llama").settings({**LLAMA_MINIMAL, "model_type": "llama"}).arch
    assert arch.rotary_base == 10000.0 and arch.share_embeddings_and_output_weights is False
    gemma = {**LLAMA_MINIMAL, "model_type": "gemma", "head_dim": 16}
    assert family_for("gemma").settings(gemma).arch.share_embeddings_and_output_weights


def test_llama_biases_map_to_megatron_linear_biases():
    from megagsm.models.families import dense

    rules = {r.mcore: r.hf for r in dense.dense_weights(tied=False, linear_bias=True).rules}
    assert rules["decoder.layers.self_attention.linear_proj.bias"] == ("model.layers.{layer}.self_attn.o_proj.bias",)
    assert rules["decoder.layers.mlp.linear_fc1.bias"] == ("model.layers.{layer}.mlp.gate_proj.bias",
                                                         "model.layers.{layer}.mlp.up_proj.bias")
    assert rules["decoder.layers.mlp.linear_fc2.bias"] == ("model.layers.{layer}.mlp.down_proj.bias",)
    assert not any(k.endswith("linear_proj.bias") for k in
                   (r.mcore for r in dense.dense_weights(tied=False).rules))


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "gemma", "qwen3", "seed_oss"])
def test_omitted_tie_word_embeddings_means_the_transformers_default(model_type):
    """transformers' config class decides what a config.json without tie_word_embeddings means
    (Qwen2/Llama/Qwen3: untied, Gemma: tied); the settings and the weight rules must both agree."""
    from transformers import AutoConfig

    from megagsm.models.registry import family_for
    from megagsm.testing.tiny_hf import tiny_config

    default = AutoConfig.for_model(model_type).tie_word_embeddings
    hf = tiny_config(model_type).to_dict()
    hf.pop("tie_word_embeddings", None)
    family = family_for(model_type)
    assert family.settings(dict(hf)).arch.share_embeddings_and_output_weights == default
    has_head = any(r.mcore == "output_layer.weight" for r in family.weights(dict(hf)).rules)
    assert has_head == (not default)


def test_conversation_truncation_by_hand():
    from megagsm.data.sft_dataset import truncate_masked

    ids, mask = [1, 10, 11, 12, 13], [0, 0, 1, 1, 1]  # BOS, a prompt token, three assistant tokens
    # left: the oldest tokens after the BOS go; right: the newest go
    assert truncate_masked(ids, mask, 4, "left", bos_id=1) == ([1, 11, 12, 13], [0, 1, 1, 1])
    assert truncate_masked(ids, mask, 4, "left") == ([10, 11, 12, 13], [0, 1, 1, 1])
    assert truncate_masked(ids, mask, 4, "right", bos_id=1) == ([1, 10, 11, 12], [0, 0, 1, 1])
    assert truncate_masked(ids, mask, 5, "error") == (ids, mask)
    with pytest.raises(SequenceTooLongError, match="5 tokens exceed seq_length"):
        truncate_masked(ids, mask, 4, "error")


def test_conversation_sample_labels_are_the_next_tokens(tokenizer):
    from megagsm.data.sft_dataset import build_conversation_sample

    messages = [{"role": "user", "content": "w10 w11"}, {"role": "assistant", "content": "w12 w13"}]
    sample = build_conversation_sample(messages, tokenizer, 64, use_chat_template="never")
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    n = len(ids)
    assert len(labels) == len(sample["loss_mask"]) == n and sample["position_ids"].tolist() == list(range(n))
    assert labels[:-1] == ids[1:] and labels[-1] == tokenizer.eos_token_id
    # the loss is on the assistant's tokens and its EOS: the labels from the response on
    response = tokenizer("w12 w13", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    picked = [t for t, m in zip(labels, sample["loss_mask"].tolist()) if m == 1.0]
    assert picked == response
    # seq_length n holds n + 1 raw tokens (inputs and labels overlap by all but one): exactly this one
    exact = build_conversation_sample(messages, tokenizer, n, use_chat_template="never")
    assert exact["input_ids"].tolist() == ids
    assert len(build_conversation_sample(messages, tokenizer, n - 1, use_chat_template="never")["input_ids"]) == n - 1


def test_router_top_k_is_between_one_and_the_expert_count():
    from megagsm.models.errors import ModelInputError
    from megagsm.models.families.moe import router_fields

    kw = dict(score="softmax", num_experts=8, normalize=False)
    assert router_fields({}, topk=1, **kw)["moe_router_topk"] == 1
    assert router_fields({}, topk=8, **kw)["moe_router_topk"] == 8
    for topk in (0, 9):
        with pytest.raises(ModelInputError, match=f"num_experts_per_tok={topk} must be within 1..8"):
            router_fields({}, topk=topk, **kw)
    # sigmoid scores: megatron renormalises top-k weights exactly when k > 1, so top-1 is unnormalised
    sigmoid = dict(score="sigmoid", num_experts=8)
    assert router_fields({}, topk=1, normalize=False, **sigmoid)["moe_router_topk"] == 1
    assert router_fields({}, topk=2, normalize=True, **sigmoid)["moe_router_topk"] == 2
    for topk, normalize in ((1, True), (2, False)):
        with pytest.raises(ModelInputError, match=f"norm_topk_prob={str(normalize).lower()} with num_experts_per_tok={topk}"):
            router_fields({}, topk=topk, normalize=normalize, **sigmoid)


def test_expert_groups_must_split_the_experts():
    from megagsm.models.errors import ModelInputError
    from megagsm.models.families.moe import router_fields

    kw = dict(score="sigmoid", topk=4, num_experts=8, normalize=True, group_score_topk=2)
    assert router_fields({}, num_groups=4, group_topk=2, **kw)["moe_router_num_groups"] == 4
    for groups, keep in ((4, None), (3, 2), (4, 5)):  # no topk_group, 8 % 3 experts, more kept than there are
        with pytest.raises(ModelInputError, match=f"n_group={groups}, topk_group={keep} do not split 8 experts"):
            router_fields({}, num_groups=groups, group_topk=keep, **kw)


def test_mlp_only_layers_edges():
    from megagsm.models.errors import ModelInputError
    from megagsm.models.families.qwen3_moe import layer_pattern

    assert layer_pattern({"num_hidden_layers": 3, "mlp_only_layers": [0, 2]}) == [0, 1, 0]
    with pytest.raises(ModelInputError, match="mlp_only_layers has 3, outside 0..2"):
        layer_pattern({"num_hidden_layers": 3, "mlp_only_layers": [3]})
    with pytest.raises(ModelInputError, match="mlp_only_layers has -1"):
        layer_pattern({"num_hidden_layers": 3, "mlp_only_layers": [-1]})


def test_deepseek_v2_configs_with_moe_layer_freq_one_convert():
    """The original DeepSeek-V2 configs carry "moe_layer_freq": 1 (every layer after the dense ones)."""
    from megagsm.models.families.deepseek import layer_pattern

    hf = {"num_hidden_layers": 4, "first_k_dense_replace": 1}
    assert layer_pattern({**hf, "moe_layer_freq": 1}) == layer_pattern(hf) == [0, 1, 1, 1]


def test_sampler_order_is_a_stable_function_of_seed_and_epoch():
    """Epoch e of seed s is torch.randperm under a generator seeded with (s * 1_000_003 + e) mod 2^63:
    a checkpoint stores only (epoch, offset), so a resumed run (possibly of a later version)
    recomputes the order from this formula and must get the same one."""
    from megagsm.data.sampler import ResumableShardedSampler

    for seed in (0, 4, 2**62):
        sampler = ResumableShardedSampler(10, seed=seed)
        for epoch in (0, 1, 2):
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
            assert torch.equal(sampler.permutation(epoch), torch.randperm(10, generator=g)), (seed, epoch)


def test_chunked_loss_needs_a_positive_chunk_size():
    from megagsm.sft.fused_ce import chunked_vocab_parallel_cross_entropy

    hidden, weight, labels = torch.randn(3, 1, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long)
    assert chunked_vocab_parallel_cross_entropy(hidden, weight, labels, 1).shape == (1, 3)
    with pytest.raises(ValueError, match="loss_chunk_size must be >= 1, got 0"):
        chunked_vocab_parallel_cross_entropy(hidden, weight, labels, 0)


def test_sampling_params_defaults():
    """A plain SamplingParams() samples from the model's distribution: 128 new tokens at temperature 1,
    no top-k / top-p, one sample per prompt, seed 0, raw log-probs, no stops."""
    from megagsm.generation.sampling import SamplingParams

    p = SamplingParams()
    assert (p.max_new_tokens, p.greedy, p.is_greedy, p.temperature, p.top_k, p.top_p, p.n, p.seed) == (
        128, False, False, 1.0, 0, 1.0, 1, 0)
    assert (p.stop_token_ids, p.stop_strings, p.logprobs) == ((), (), "raw")


def test_top_k_at_or_above_the_vocabulary_is_off():
    """top_k >= V keeps every token: the same draws as top_k=0 under the same seed (not merely the
    same distribution), with or without top-p."""
    from megagsm.generation.sampling import Sampler, SamplingParams

    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    for top_p in (1.0, 0.9):
        off, _ = Sampler(SamplingParams(top_k=0, top_p=top_p, seed=3), torch.device("cpu"))(logits)
        for k in (20, 21):
            tokens, _ = Sampler(SamplingParams(top_k=k, top_p=top_p, seed=3), torch.device("cpu"))(logits)
            assert torch.equal(tokens, off), (k, top_p)
    below, _ = Sampler(SamplingParams(top_k=19, seed=3), torch.device("cpu"))(logits)
    assert not torch.equal(below, off)  # the comparison can tell the paths apart


def test_top_p_one_is_off():
    """top_p = 1.0 masks nothing. At a real vocabulary size (Qwen2's 152064) fp32 rounding makes the
    cumulative mass before some tail tokens reach 1.0, so a filter applied at top_p = 1 would drop them
    and renormalise: the processed log-prob of the drawn token is exactly the full log-softmax."""
    from megagsm.generation.sampling import Sampler, SamplingParams

    logits = torch.randn(4, 152064, generator=torch.Generator().manual_seed(0)) * 4
    tokens, logprobs = Sampler(SamplingParams(top_p=1.0, logprobs="processed", seed=0), torch.device("cpu"))(logits)
    pick = tokens.unsqueeze(-1)
    assert torch.equal(logprobs, torch.log_softmax(logits, dim=-1).gather(-1, pick).squeeze(-1))
    probs = torch.softmax(logits, dim=-1)
    dropped = logits.masked_fill(probs.cumsum(-1) - probs >= 1.0, float("-inf"))  # a filter at top_p = 1
    assert not torch.equal(torch.log_softmax(dropped, dim=-1).gather(-1, pick).squeeze(-1), logprobs)


def test_top_p_drops_a_token_once_the_mass_before_it_equals_top_p():
    """verl/vLLM's rule: a candidate is dropped once the mass strictly before it reaches top_p, equality
    included. top_p set to exactly the fp32 mass before the second token (as the sampler computes it)
    leaves only the first token: every draw is it, and its processed log-prob is 0."""
    from megagsm.generation.sampling import Sampler, SamplingParams

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0]]).expand(64, 4).contiguous()
    probs = torch.softmax(logits.sort(dim=-1, descending=True).values, dim=-1)
    top_p = float((probs.cumsum(-1) - probs)[0, 1])  # what the sampler compares against top_p
    tokens, logprobs = Sampler(SamplingParams(top_p=top_p, logprobs="processed", seed=3), torch.device("cpu"))(logits)
    assert tokens.tolist() == [0] * 64 and torch.equal(logprobs, torch.zeros(64))
