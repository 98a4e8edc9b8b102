"""A run's examples from its `data` section: (train, held-out) lists of GSM8K examples, from files,
a `datasets` name or the synthetic generator."""
from __future__ import annotations

from megagsm.config.data import DataConfig
from megagsm.data.gsm8k import GSM8KExample, load_gsm8k


def synthetic_examples(data: DataConfig) -> tuple[list[GSM8KExample], list[GSM8KExample]]:
    from megagsm.data.synthetic import generate_splits

    train, test = generate_splits(data.n_train, data.n_test, level=data.difficulty, seed=data.seed)

    def to_example(p) -> GSM8KExample:
        return GSM8KExample(question=p.question, answer=p.answer, final_answer=str(p.final))

    return [to_example(p) for p in train], [to_example(p) for p in test]


def _load_split(data: DataConfig, path: str, split: str) -> list[GSM8KExample]:
    rows = load_gsm8k(path, split=split, on_bad_row=data.on_bad_row)
    if data.prompt_key == "question" and data.answer_key == "answer":
        return rows
    raise NotImplementedError("data.prompt_key/answer_key other than question/answer")


def load_examples(data: DataConfig) -> tuple[list[GSM8KExample], list[GSM8KExample]]:
    """(train, held-out) examples; the held-out list is empty when there is none."""
    if data.source == "synthetic":
        return synthetic_examples(data)
    train = _load_split(data, data.train_path, "train")
    held_out = _load_split(data, data.eval_path, "test") if data.eval_path else []
    return train, held_out
