"""Chat messages -> text and token ids: with the tokenizer's chat template, or a plain rendering for
tokenizers without one.

Plain rendering (no chat template): each non-assistant turn is its content followed by a newline (so a
single user turn renders exactly as a text prompt does under a template with the default ``"\\n"``
suffix); an assistant turn is its content followed by the EOS token. Roles are not spelled out: the
tiny tokenizers the CPU runs use have no role tokens, and the single-turn case must equal the text
prompt path.

A conversation (multi-turn SFT) is rendered turn by turn: the text of the first ``i`` turns must be a
prefix of the text of the first ``i + 1`` (true of the usual templates); the tokens each assistant turn
adds, after the template's assistant header, are the ones SFT trains on (its end-of-turn marker
included). Each piece is tokenised separately, as prompt and response are in single-turn SFT.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from megagsm.errors import UserError

Messages = Sequence[Mapping[str, str]]


def render_plain(messages: Messages) -> str:
    """A chat prompt as plain text (no chat template): each turn's content and a newline."""
    return "".join(m["content"] + "\n" for m in messages)


def render_chat(messages: Messages, tokenizer: Any, add_generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def encode_conversation(messages: Messages, tokenizer: Any, use_chat: bool,
                        row_name: str = "row") -> tuple[list[int], list[int]]:
    """(token ids, mask) of a whole conversation; mask is 1 on the tokens of assistant turns."""
    ids: list[int] = []
    mask: list[int] = []
    if not use_chat:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise UserError(f"{row_name}: the tokenizer has no eos_token_id to end assistant turns")
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                piece = _encode(tokenizer, m["content"], False) + [int(eos)]
                ids += piece
                mask += [1] * len(piece)
            else:
                piece = _encode(tokenizer, m["content"] + "\n", not ids)
                ids += piece
                mask += [0] * len(piece)
        return ids, mask
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
            text = render_chat(messages[:i + 1], tokenizer, add_generation_prompt=False)
            pieces = [(head, 0), (text, 1)]
        else:
            text = render_chat(messages[:i + 1], tokenizer, add_generation_prompt=False)
            pieces = [(text, 0)]
        for rendered, trained in pieces:
            if not rendered.startswith(done):
                raise UserError(f"{row_name}: the chat template does not render this conversation turn by "
                                f"turn (turn {i} changes the text before it), so assistant turns cannot be "
                                "located; use single-turn rows (data.prompt_key / data.answer_key)")
            piece = _encode(tokenizer, rendered[len(done):], False)
            ids += piece
            mask += [trained] * len(piece)
            done = rendered
    return ids, mask
