"""Train a tiny byte-level BPE tokenizer for the synthetic / CPU runs.

Digits are split one per token before BPE runs, so "472" is always "4","7","2": a tiny model then
learns column arithmetic over a ten-symbol alphabet instead of memorising hundreds of number tokens.
Words and whitespace are merged by ordinary byte-level BPE, which round-trips any text exactly.

The result is saved as a ``PreTrainedTokenizerFast`` directory (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) that ``AutoTokenizer.from_pretrained`` loads.
It has no chat template on purpose, so prompts use the plain-text template path. Plain-text encoding
(``add_special_tokens=True``) prepends BOS, like Llama-family tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0..3 in this order
_ASCII_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def _byte_level_symbols(text: str) -> list[str]:
    """The byte-level (GPT-2) symbols that stand for ``text``'s UTF-8 bytes."""
    from tokenizers import pre_tokenizers

    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return [symbol for piece, _ in pieces for symbol in piece]


def build_tokenizer_object(texts: Iterable[str], vocab_size: int, *, full_byte_alphabet: bool = False):
    """A trained ``tokenizers.Tokenizer`` (not yet wrapped for transformers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # The alphabet is printable ASCII plus newline and tab (all ten digits always present), not all 256
    # bytes, which leaves room in tiny vocabularies (~128-512) for merges; other bytes become <unk>.
    if full_byte_alphabet:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        alphabet = sorted({tok for ch in _ASCII_ALPHABET for tok in _byte_level_symbols(ch)})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    full_byte_alphabet: bool = False,
    model_max_length: int = 4096,
):
    """Train a digit-splitting byte-level BPE on ``texts``, save it to ``out_dir`` and return it loaded.

    ``vocab_size`` is an upper bound: BPE stops early when no merges are left. The directory is written
    to a temporary sibling and renamed into place, so a crash never leaves a half-written tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no training texts")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too small")
    tokenizer_object = build_tokenizer_object(texts, vocab_size, full_byte_alphabet=full_byte_alphabet)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give it an ordinary directory's mode
    try:
        hf_tokenizer.save_pretrained(str(tmp))
        _write_compat_files(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_tokenizer(out)


def _umask() -> int:
    from megagsm.utils.atomic import current_umask

    return current_umask()


# A fixed English + arithmetic corpus for test tokenizers: every ASCII symbol is in the alphabet, so
# any ASCII text encodes (nothing becomes <unk>) and words merge into a few tokens.
_TEST_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step and output "
    "the final answer after \"####\".\nNatalia sold 48/2 = 24 clips in May.\n#### 72\n"
    "What is 12 + 7? The answer is 19. Weng earns $12 an hour for babysitting. Question: Answer:\n"
)


def save_test_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256):
    """A small byte-level BPE (digits one per token, BOS/EOS/PAD) for tiny test models, trained on a
    fixed corpus: unlike a word-level vocabulary it round-trips any ASCII text through
    AutoTokenizer.from_pretrained, whatever model_type the config.json beside it names (transformers
    5 rebuilds e.g. Qwen2Tokenizer from the vocabulary and merges, which a word-level model lacks).
    The tokenizer files join whatever `out_dir` holds (a model's config.json and weights stay)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out) as tmp:
        train_tokenizer([_TEST_CORPUS] * 4, vocab_size, Path(tmp) / "tok")
        for f in (Path(tmp) / "tok").iterdir():
            shutil.copy2(f, out / f.name)
    return load_tokenizer(out)


def _write_compat_files(directory: Path) -> None:
    """Make the saved directory loadable by transformers 4.x as well as 5.x.

    transformers 5 names the class ``TokenizersBackend`` and drops ``special_tokens_map.json``; 4.x
    knows only ``PreTrainedTokenizerFast`` (which 5.x still resolves) and reads the special-token map.
    """
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tokenizer_training_texts(examples: Iterable, template: str | None = None) -> list[str]:
    """Texts to train on: each rendered plain-text prompt followed by its answer.

    The prompt template's instruction must be in the training texts, or BPE never merges it and every
    prompt costs ~60 single-character tokens. ``examples`` have ``question`` and ``answer`` (attributes
    or keys).
    """
    from megagsm.data.prompts import DEFAULT_TEMPLATE, build_prompt

    texts = []
    for example in examples:
        question = example["question"] if isinstance(example, dict) else example.question
        answer = example["answer"] if isinstance(example, dict) else example.answer
        texts.append(build_prompt(question, None, template or DEFAULT_TEMPLATE) + answer)
    return texts


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained`` on a local directory (never runs remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
