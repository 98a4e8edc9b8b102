"""Examples for a run, as ``data.*`` says (the one call the trainers and the evaluation make)."""
from __future__ import annotations

from typing import Literal

from megagsm.config.data import DataConfig
from megagsm.data.gsm8k import GSM8KExample, load_gsm8k_files


def load_config_examples(data: DataConfig, which: Literal["train", "eval"]) -> list[GSM8KExample]:
    """The examples of ``data.train_path`` (split "train") or ``data.eval_path`` (split "test") under
    ``data.source`` / ``prompt_key`` / ``answer_key`` / ``messages_key`` / ``on_bad_row``; [] when the
    path is unset. Bad data raises a UserError naming the file, the row and the field."""
    if data.source == "synthetic":
        raise ValueError("data.source=synthetic has no files; use megagsm.data.synthetic.generate_splits")
    paths = data.train_path if which == "train" else data.eval_path
    field = "data.train_path" if which == "train" else "data.eval_path"
    return load_gsm8k_files(
        paths or [], "train" if which == "train" else "test", on_bad_row=data.on_bad_row,
        prompt_key=data.prompt_key, answer_key=data.answer_key, messages_key=data.messages_key,
        kind=data.source, field=field,
    )


def synthetic_examples(data: DataConfig) -> tuple[list[GSM8KExample], list[GSM8KExample]]:
    """(train, test) generated problems of data.n_train / n_test / difficulty / seed."""
    from megagsm.data.synthetic import generate_splits

    train, test = generate_splits(data.n_train, data.n_test, level=data.difficulty, seed=data.seed)
    to_example = lambda p: GSM8KExample(question=p.question, answer=p.answer, final_answer=str(p.final))  # noqa: E731
    return [to_example(p) for p in train], [to_example(p) for p in test]


def load_run_examples(data: DataConfig) -> tuple[list[GSM8KExample], list[GSM8KExample]]:
    """(train, held-out) examples of a run, whatever data.source is; held-out is [] without eval_path."""
    if data.source == "synthetic":
        return synthetic_examples(data)
    return load_config_examples(data, "train"), load_config_examples(data, "eval")
