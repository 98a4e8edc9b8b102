"""SFT samples: prompt + response tokens, loss only on the response, in megatron GPTModel's layout.

A sample is built from ``full = prompt_ids + response_ids + [eos]`` as

- ``input_ids = full[:-1]``, ``labels = full[1:]`` (labels[t] is the token after input_ids[t], which is
  what ``GPTModel.forward(labels=...)`` expects: it does not shift),
- ``loss_mask[t] = 1`` where ``labels[t]`` is a response token or the EOS, else 0,
- ``position_ids = 0..n-1``.

So ``seq_length`` counts model inputs and a sample may hold ``seq_length + 1`` raw tokens, as in
megatron's GPTDataset. Prompt and response are tokenised separately, so the prompt tokens are exactly
those generation will see (joint tokenisation could merge across the boundary).

Truncation when ``full`` is longer than ``seq_length + 1``:

- ``"left"``: drop tokens from the start of the prompt (a leading BOS is kept). If the response alone
  does not fit next to one prompt token it raises, since cutting the response is a different policy.
- ``"right"``: cut the end of the response (the EOS goes first). Raises if no response token is left.
- ``"error"``: raise :class:`SequenceTooLongError` naming the row.

Examples with chat ``messages`` (verl's ``prompt`` column) take them as the prompt (chat template, or
the plain rendering of :mod:`megagsm.data.chat`). Examples with a ``conversation`` (``data.messages_key``)
are one token sequence with the loss on every assistant turn (:func:`build_conversation_sample`);
``"left"`` truncation drops tokens from the start (a leading BOS kept), ``"right"`` from the end.

Padding uses the pad id in ``input_ids`` and ``labels`` with ``loss_mask`` 0: labels must stay valid
vocabulary ids because megatron's vocab-parallel cross entropy has no ignore index.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import torch

from megagsm.data.chat import encode_conversation
from megagsm.data.gsm8k import GSM8KExample, strip_calculator_annotations
from megagsm.data.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    UseChatTemplate,
    encode_example_prompt,
    encode_prompt,
    prompt_uses_chat_template,
)
from megagsm.errors import UserError

Truncation = Literal["left", "right", "error"]
Sample = dict[str, torch.Tensor]


class SequenceTooLongError(UserError):
    """A row that does not fit data.seq_length under data.truncation; the message names the row."""


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set one to pad batches")
    return int(pad)


def truncate_prompt_response(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    max_tokens: int,
    truncation: Truncation,
    *,
    bos_id: int | None = None,
    row_name: str = "row",
) -> tuple[list[int], list[int]]:
    """Fit ``prompt + response`` into ``max_tokens`` raw tokens by the policy in the module docstring."""
    prompt, response = list(prompt_ids), list(response_ids)
    total = len(prompt) + len(response)
    if total <= max_tokens:
        return prompt, response
    if truncation == "error":
        raise SequenceTooLongError(
            f"{row_name}: {total} tokens (prompt {len(prompt)} + response {len(response)}) exceed "
            f"seq_length + 1 = {max_tokens}; use truncation='left' or 'right', or a longer seq_length"
        )
    if truncation == "left":
        keep_bos = bool(prompt) and bos_id is not None and prompt[0] == bos_id
        head = prompt[:1] if keep_bos else []
        budget = max_tokens - len(response) - len(head)
        # The first response token needs one prompt token before it; a kept BOS is that token.
        if budget < (0 if keep_bos else 1):
            raise SequenceTooLongError(
                f"{row_name}: the response alone ({len(response)} tokens) does not fit in seq_length + 1 = "
                f"{max_tokens} with a prompt token before it; use truncation='right' or a longer seq_length"
            )
        body = prompt[len(head):]
        return head + body[len(body) - budget:], response
    if truncation == "right":
        keep = max_tokens - len(prompt)
        if keep < 1:
            raise SequenceTooLongError(
                f"{row_name}: the prompt alone ({len(prompt)} tokens) fills seq_length + 1 = {max_tokens}; "
                "no response token would be trained; use truncation='left' or a longer seq_length"
            )
        return prompt, response[:keep]
    raise ValueError(f"truncation must be 'left', 'right' or 'error', got {truncation!r}")


def make_sample(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Sample:
    """input_ids/labels/loss_mask/position_ids from already truncated prompt and response ids."""
    full = list(prompt_ids) + list(response_ids)
    if len(prompt_ids) < 1 or len(response_ids) < 1:
        raise ValueError("a sample needs at least one prompt token and one response token")
    ids = torch.tensor(full, dtype=torch.long)
    n = len(full) - 1
    loss_mask = torch.zeros(n, dtype=torch.float32)
    loss_mask[len(prompt_ids) - 1:] = 1.0  # labels[t] = full[t+1] is a response token from t = len(prompt)-1
    return {
        "input_ids": ids[:-1].clone(),
        "labels": ids[1:].clone(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(n, dtype=torch.long),
    }


def build_sft_sample(
    question: str,
    response: str,
    tokenizer: Any,
    seq_length: int,
    *,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    truncation: Truncation = "left",
    use_chat_template: UseChatTemplate = "auto",
    add_eos: bool = True,
    row_name: str = "row",
) -> Sample:
    prompt_ids = encode_prompt(question, tokenizer, template, use_chat_template=use_chat_template)
    return sample_from_prompt_ids(prompt_ids, response, tokenizer, seq_length, truncation=truncation,
                                  add_eos=add_eos, row_name=row_name)


def sample_from_prompt_ids(
    prompt_ids: Sequence[int],
    response: str,
    tokenizer: Any,
    seq_length: int,
    *,
    truncation: Truncation = "left",
    add_eos: bool = True,
    row_name: str = "row",
) -> Sample:
    """A sample from already encoded prompt ids and the response text (tokenised without specials)."""
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        response_ids.append(int(tokenizer.eos_token_id))
    prompt_ids, response_ids = truncate_prompt_response(
        prompt_ids, response_ids, seq_length + 1, truncation,
        bos_id=getattr(tokenizer, "bos_token_id", None), row_name=row_name,
    )
    return make_sample(prompt_ids, response_ids)


def truncate_masked(ids: Sequence[int], mask: Sequence[int], max_tokens: int, truncation: Truncation, *,
                    bos_id: int | None = None, row_name: str = "row") -> tuple[list[int], list[int]]:
    """Fit a conversation's ids (and its per-token loss mask) into ``max_tokens`` raw tokens."""
    ids, mask = list(ids), list(mask)
    if len(ids) > max_tokens:
        if truncation == "error":
            raise SequenceTooLongError(f"{row_name}: {len(ids)} tokens exceed seq_length + 1 = {max_tokens}; "
                                       "use truncation='left' or 'right', or a longer seq_length")
        if truncation == "left":
            keep_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
            head = 1 if keep_bos else 0
            cut = len(ids) - max_tokens
            ids, mask = ids[:head] + ids[head + cut:], mask[:head] + mask[head + cut:]
        elif truncation == "right":
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        else:
            raise ValueError(f"truncation must be 'left', 'right' or 'error', got {truncation!r}")
    if not any(mask[1:]):  # labels are ids[1:]: the first token is never a label
        raise SequenceTooLongError(f"{row_name}: no assistant token is left to train on in seq_length + 1 = "
                                   f"{max_tokens} tokens (truncation={truncation!r}); use a longer seq_length")
    return ids, mask


def build_conversation_sample(messages, tokenizer: Any, seq_length: int, *, truncation: Truncation = "left",
                              use_chat_template: UseChatTemplate = "auto", row_name: str = "row") -> Sample:
    """A multi-turn SFT sample: input_ids/labels as in :func:`make_sample`, ``loss_mask[t] = 1`` where
    ``labels[t]`` is a token of an assistant turn (see :mod:`megagsm.data.chat`)."""
    use_chat = prompt_uses_chat_template(tokenizer, use_chat_template)
    ids, mask = encode_conversation(messages, tokenizer, use_chat, row_name=row_name)
    ids, mask = truncate_masked(ids, mask, seq_length + 1, truncation,
                                bos_id=getattr(tokenizer, "bos_token_id", None), row_name=row_name)
    full = torch.tensor(ids, dtype=torch.long)
    n = len(ids) - 1
    return {
        "input_ids": full[:-1].clone(),
        "labels": full[1:].clone(),
        "loss_mask": torch.tensor(mask[1:], dtype=torch.float32),
        "position_ids": torch.arange(n, dtype=torch.long),
    }


def _question_answer(example: Any) -> tuple[str, str]:
    if isinstance(example, GSM8KExample) or (hasattr(example, "question") and hasattr(example, "answer")):
        return example.question, example.answer
    if isinstance(example, Mapping):
        return example["question"], example["answer"]
    question, answer = example
    return question, answer


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised SFT samples of GSM8K-style examples (GSM8KExample, {"question","answer"} or pairs);
    a GSM8KExample with ``messages`` uses them as its prompt, one with a ``conversation`` trains on its
    assistant turns.

    Tokenises everything up front: GSM8K-sized sets take seconds, and packing needs the lengths.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        tokenizer: Any,
        seq_length: int,
        *,
        template: str | PromptTemplate = DEFAULT_TEMPLATE,
        truncation: Truncation = "left",
        use_chat_template: UseChatTemplate = "auto",
        strip_calculator: bool = False,
        add_eos: bool = True,
        source_name: str = "examples",
    ):
        if seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {seq_length}")
        self.seq_length = seq_length
        self.pad_id = _pad_id(tokenizer)
        self.samples: list[Sample] = []
        for index, example in enumerate(examples):
            row_name = f"{source_name} row {index}"
            conversation = getattr(example, "conversation", None)
            if conversation:
                self.samples.append(build_conversation_sample(
                    conversation, tokenizer, seq_length, truncation=truncation,
                    use_chat_template=use_chat_template, row_name=row_name))
                continue
            question, answer = _question_answer(example)
            if not isinstance(answer, str) or not answer.strip():
                raise UserError(f"{row_name}: no response to train on (verl RL rows need extra_info.answer; "
                                "set data.answer_key to the column holding the solution)")
            response = strip_calculator_annotations(answer) if strip_calculator else answer
            if getattr(example, "messages", None):
                prompt_ids = encode_example_prompt(example, tokenizer, template, use_chat_template=use_chat_template)
                self.samples.append(sample_from_prompt_ids(
                    prompt_ids, response, tokenizer, seq_length, truncation=truncation, add_eos=add_eos,
                    row_name=row_name))
                continue
            self.samples.append(
                build_sft_sample(
                    question, response, tokenizer, seq_length, template=template, truncation=truncation,
                    use_chat_template=use_chat_template, add_eos=add_eos, row_name=row_name,
                )
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def collate_sft(
    samples: Sequence[Sample], pad_id: int, seq_length: int | None = None, pad_to_multiple_of: int | None = None
) -> Sample:
    """Right-pad samples into ``[B, S]`` tensors.

    ``S`` is ``seq_length`` when given; otherwise the longest sample rounded up to ``pad_to_multiple_of``.
    Right padding needs no attention mask under causal attention: real tokens never attend to it.
    """
    longest = max(len(s["input_ids"]) for s in samples)
    if seq_length is not None:
        if longest > seq_length:
            raise ValueError(f"a sample has {longest} tokens, more than seq_length={seq_length}")
        target = seq_length
    else:
        target = longest
        if pad_to_multiple_of:
            target = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    out = {
        "input_ids": torch.full((batch, target), pad_id, dtype=torch.long),
        "labels": torch.full((batch, target), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((batch, target), dtype=torch.float32),
        "position_ids": torch.arange(target, dtype=torch.long).expand(batch, target).clone(),
    }
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        for key in ("input_ids", "labels", "loss_mask"):
            out[key][row, :n] = sample[key]
    return out
