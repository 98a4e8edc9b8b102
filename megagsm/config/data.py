"""Where training/eval examples come from and how they are cut to length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    # jsonl / parquet: local files; hf: a datasets name or saved dir in train_path (eval_path likewise);
    # synthetic: generated GSM8K-style problems (n_train, n_test, difficulty, seed below).
    source: Literal["jsonl", "parquet", "hf", "synthetic"] = "synthetic"
    train_path: str | None = None
    eval_path: str | None = None
    prompt_key: str = "question"       # column holding the problem text
    answer_key: str = "answer"         # column holding the reference answer / solution
    prompt_template: str = "default"   # name of a registered prompt template
    max_prompt_len: int = 256          # tokens
    max_response_len: int = 256        # tokens
    seq_length: int = 512              # tokens per training sequence (padded or packed)
    truncation: Literal["left", "right", "error"] = "left"  # which end of an over-long prompt is cut
    pack_sequences: bool = False
    on_bad_row: Literal["skip", "error"] = "error"   # malformed row: skip it (counted, logged) or fail
    # synthetic source
    n_train: int = 1000
    n_test: int = 100
    difficulty: int = 0                # synthetic level, 0 (easiest: one addition) to 4
    seed: int = 0
