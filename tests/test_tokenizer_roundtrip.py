"""The tiny tokenizers megagsm writes round-trip through AutoTokenizer.from_pretrained, also inside a
model dir whose config.json names a model_type (transformers then picks that family's tokenizer class)."""

import pytest

TEXTS = ["Natalia sold 48 clips", "What is 12 + 7?\n", "  two  spaces, a tab\tand 90210!", "Zebra quux"]


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "gemma", "qwen3", "seed_oss"])
def test_test_tokenizer_round_trips_beside_a_model_config(tmp_path, model_type):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from megagsm.data.tokenizer import save_test_tokenizer
    from megagsm.testing.tiny_hf import tiny_config

    save_test_tokenizer(tmp_path / "m")
    tiny_config(model_type).save_pretrained(str(tmp_path / "m"))
    raw = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))  # the trained object itself
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    for text in TEXTS:
        ids = auto(text)["input_ids"]
        assert ids == raw.encode(text).ids and ids[0] == auto.bos_token_id and len(ids) > 1
        assert auto.decode(ids, skip_special_tokens=True) == text
        assert auto.unk_token_id not in ids


def test_trained_tokenizer_dir_has_an_ordinary_mode(tmp_path):
    import os
    import stat

    from megagsm.data.tokenizer import save_test_tokenizer

    old = os.umask(0o022)
    try:
        save_test_tokenizer(tmp_path / "t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) == 0o755
