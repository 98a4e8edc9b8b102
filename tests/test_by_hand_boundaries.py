"""Small truths computed by hand that the first `make mutate` run found unchecked: GSPO's default
advantages are (r - mean) / (unbiased std + 1e-6) (Python's statistics module as the reference, and
a group whose std is comparable to eps), and the SFT row builder's edges (EOS appended by default,
the tokenizer's own pad id, the smallest sequence length, the last token budgets that still fit)."""
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
    from megagsm.models.families import dense

    arch = dense.llama_settings(dict(LLAMA_MINIMAL)).arch
    assert arch.rotary_base == 10000.0 and arch.share_embeddings_and_output_weights is False
    assert dense.llama_settings(dict(LLAMA_MINIMAL), tied_default=True).arch.share_embeddings_and_output_weights


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
