"""When a sequence is finished: an EOS/stop token, a stop string, or the token budget.

Stop strings are matched on decoded text. Decoding the whole completion every step would cost
O(length^2); only a tail of recent tokens is decoded, long enough to hold the longest stop string
(every token decodes to at least one character, plus slack for tokens that decode to part of a
character). A string found in the tail is new: an earlier occurrence would have stopped the row.
"""
from __future__ import annotations

import torch

FINISH_EOS = "eos"            # a stop token id (the tokenizer's EOS, or any given id)
FINISH_STOP_STRING = "stop"   # a stop string appeared in the decoded completion
FINISH_LENGTH = "length"      # max_new_tokens reached


class StopChecker:
    def __init__(self, stop_token_ids, stop_strings, tokenizer, device):
        self.stop_ids = (
            torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
            if stop_token_ids else None
        )
        self.stop_strings = tuple(stop_strings)
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (generate(..., tokenizer=...))")
        self.tokenizer = tokenizer
        self.tail_tokens = max((len(s) for s in self.stop_strings), default=0) + 8

    def eos_hits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.stop_ids is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, self.stop_ids)

    def string_hits(self, completions: torch.Tensor, rows: list[int], length: int | list[int]) -> list[int]:
        """Rows (indices into `rows`) whose completion tokens [:length] now contain a stop string.
        completions: [num_sequences, max_new] token ids on the CPU; rows: sequence ids to check; length:
        one for all rows or one per row (refilled batches hold sequences at different steps)."""
        if not self.stop_strings or not rows:
            return []
        lengths = [length] * len(rows) if isinstance(length, int) else length
        tails = [completions[row, max(0, n - self.tail_tokens):n].tolist() for row, n in zip(rows, lengths)]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
        return [i for i, text in enumerate(texts) if any(s in text for s in self.stop_strings)]

    def truncate_text(self, text: str) -> str:
        """The completion text up to and including the first stop string."""
        cut = min(
            (text.find(s) + len(s) for s in self.stop_strings if s in text), default=len(text)
        )
        return text[:cut]
