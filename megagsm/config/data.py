"""Where training/eval examples come from and how they are cut to length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union


@dataclass
class DataConfig:
    # jsonl / parquet: local files; hf: a datasets name or saved dir in train_path (eval_path likewise);
    # synthetic: generated GSM8K-style problems (n_train, n_test, difficulty, seed below).
    source: Literal["jsonl", "parquet", "hf", "synthetic"] = "synthetic"
    train_path: Union[str, list[str], None] = None  # a path, or a list of paths whose examples are concatenated (verl's train_files=['a','b'])
    eval_path: Union[str, list[str], None] = None   # likewise, for held-out evaluation (split "test" of datasets sources)
    prompt_key: str = "question"       # column or dotted path (extra_info.question) of the prompt: text, or chat messages; verl's RL layout (prompt, reward_model, ...) is recognised with the defaults
    answer_key: str = "answer"         # column or dotted path (extra_info.answer) of the response; ground truth: reward_model.ground_truth if the row has one, else the answer's '#### N'
    messages_key: Union[str, None] = None  # multi-turn chat column (e.g. messages) for SFT: loss on the assistant turns
    prompt_template: str = "default"   # registered template for text prompts ("default": gsm8k_step_by_step); chat-message prompts are used as they are
    max_prompt_len: int = 256          # tokens
    max_response_len: int = 256        # tokens
    seq_length: int = 512              # tokens per training sequence (padded or packed)
    truncation: Literal["left", "right", "error"] = "left"  # which end of an over-long prompt is cut
    pack_sequences: bool = False       # SFT: samples packed into seq_length rows, fed as THD documents (needs parallel.cp=1)
    on_bad_row: Literal["skip", "error"] = "error"  # error (default): a malformed row stops the run naming file, row and field; skip: drop it (counted, logged)
    # synthetic source
    n_train: int = 1000
    n_test: int = 100
    difficulty: int = 0                # synthetic level, 0 (easiest: one addition) to 4
    seed: int = 0
