"""Prompt templates shared by SFT, generation and GSPO.

One template turns a question into the user text. When the tokenizer has a chat template, that text
becomes a single user turn rendered with ``apply_chat_template(add_generation_prompt=True)``; otherwise
the user text is the prompt itself, followed by the template's ``plain_suffix``.

SFT and GSPO use the same template by default, on purpose: a policy trained by SFT on the bare question
and then sampled in RL on question + instruction sees a prompt it was never trained on, and its first RL
steps score lower reward for no reason of its own (several public recipes lose reward this way). Keep
``DEFAULT_TEMPLATE`` for both stages unless a run changes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from megagsm.data.chat import Messages, render_chat, render_plain
from megagsm.errors import UserError

UseChatTemplate = Literal["auto", "always", "never"]
Truncation = Literal["left", "right", "error"]


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    user_format: str  # str.format pattern with a {question} field
    # Appended after the user text when no chat template is used, so the response starts on a new line.
    plain_suffix: str = "\n"

    def user_text(self, question: str) -> str:
        return self.user_format.format(question=question)


_TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    if template.name in _TEMPLATES:
        raise ValueError(f"prompt template {template.name!r} is already registered")
    if "{question}" not in template.user_format:
        raise ValueError(f"prompt template {template.name!r}: user_format has no {{question}} field")
    _TEMPLATES[template.name] = template
    return template


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """A registered template by name; ``"default"`` (data.prompt_template's default) is DEFAULT_TEMPLATE."""
    if isinstance(name, PromptTemplate):
        return name
    if name == "default":
        name = DEFAULT_TEMPLATE
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown prompt template {name!r}; known: {sorted(_TEMPLATES)}") from None


def list_templates() -> list[str]:
    return sorted(_TEMPLATES)


# The instruction used by most open GSM8K RL recipes; the answer format matches the reward's "#### N".
STEP_BY_STEP = register_template(
    PromptTemplate(
        name="gsm8k_step_by_step",
        user_format="{question} Let's think step by step and output the final answer after \"####\".",
    )
)
BARE = register_template(PromptTemplate(name="bare", user_format="{question}"))
QUESTION_ANSWER = register_template(
    PromptTemplate(name="question_answer", user_format="Question: {question}\nAnswer:", plain_suffix=" ")
)

DEFAULT_TEMPLATE = STEP_BY_STEP.name


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _resolve_chat(tokenizer: Any, use_chat_template: UseChatTemplate) -> bool:
    if use_chat_template == "never" or tokenizer is None:
        if use_chat_template == "always":
            raise ValueError("use_chat_template='always' needs a tokenizer")
        return False
    if use_chat_template == "always":
        if not has_chat_template(tokenizer):
            raise ValueError("use_chat_template='always' but the tokenizer has no chat_template")
        return True
    if use_chat_template != "auto":
        raise ValueError(f"use_chat_template must be 'auto', 'always' or 'never', got {use_chat_template!r}")
    return has_chat_template(tokenizer)


def build_prompt(
    question: str,
    tokenizer: Any = None,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    *,
    use_chat_template: UseChatTemplate = "auto",
    system_prompt: str | None = None,
) -> str:
    """The prompt text for ``question``: chat-rendered when the tokenizer has a chat template."""
    tmpl = get_template(template)
    user = tmpl.user_text(question)
    if not _resolve_chat(tokenizer, use_chat_template):
        return (f"{system_prompt}\n" if system_prompt else "") + user + tmpl.plain_suffix
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered


def prompt_uses_chat_template(tokenizer: Any, use_chat_template: UseChatTemplate = "auto") -> bool:
    return _resolve_chat(tokenizer, use_chat_template)


def encode_prompt(
    question: str,
    tokenizer: Any,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    *,
    use_chat_template: UseChatTemplate = "auto",
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of the prompt, tokenised the way SFT, generation and GSPO must all do it.

    Chat-rendered text already carries the template's special tokens (BOS included, when the model has
    one), so it is encoded with ``add_special_tokens=False``; plain text is encoded with the tokenizer's
    own special tokens (its post-processor adds BOS if the model uses one).
    """
    chat = _resolve_chat(tokenizer, use_chat_template)
    text = build_prompt(
        question, tokenizer, template, use_chat_template="always" if chat else "never", system_prompt=system_prompt
    )
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def build_messages_prompt(messages: Messages, tokenizer: Any = None, *,
                          use_chat_template: UseChatTemplate = "auto") -> str:
    """The prompt text of chat messages (verl's ``prompt`` column): the chat template with the
    generation prompt when the tokenizer has one, else :func:`megagsm.data.chat.render_plain`."""
    if _resolve_chat(tokenizer, use_chat_template):
        return render_chat(messages, tokenizer, add_generation_prompt=True)
    return render_plain(messages)


def build_example_prompt(example: Any, tokenizer: Any = None, template: str | PromptTemplate = DEFAULT_TEMPLATE,
                         *, use_chat_template: UseChatTemplate = "auto", system_prompt: str | None = None) -> str:
    """The prompt text of an example: its chat ``messages`` when it has them (the template is not
    applied: they carry their own instruction), else ``template`` around its ``question``."""
    messages = getattr(example, "messages", None)
    if messages:
        return build_messages_prompt(messages, tokenizer, use_chat_template=use_chat_template)
    return build_prompt(example.question, tokenizer, template, use_chat_template=use_chat_template,
                        system_prompt=system_prompt)


def encode_example_prompt(example: Any, tokenizer: Any, template: str | PromptTemplate = DEFAULT_TEMPLATE,
                          *, use_chat_template: UseChatTemplate = "auto", system_prompt: str | None = None) -> list[int]:
    """Token ids of :func:`build_example_prompt`, tokenised as :func:`encode_prompt` does (chat text
    without added special tokens, plain text with them)."""
    messages = getattr(example, "messages", None)
    if not messages:
        return encode_prompt(example.question, tokenizer, template, use_chat_template=use_chat_template,
                             system_prompt=system_prompt)
    chat = _resolve_chat(tokenizer, use_chat_template)
    text = build_messages_prompt(messages, tokenizer, use_chat_template="always" if chat else "never")
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def truncate_prompt(ids: Sequence[int], limit: int, truncation: Truncation, what: str) -> list[int]:
    """Prompt ids cut to ``limit`` (data.max_prompt_len) tokens: ``left`` keeps the end (verl's
    ``truncation=left``), ``right`` the start; ``error`` raises a UserError naming ``what`` (e.g.
    "train.parquet row 7") and data.max_prompt_len."""
    ids = list(ids)
    if limit < 1:
        raise UserError(f"data.max_prompt_len={limit} is out of range (allowed: >= 1)")
    if len(ids) <= limit:
        return ids
    if truncation == "left":
        return ids[len(ids) - limit:]
    if truncation == "right":
        return ids[:limit]
    if truncation == "error":
        raise UserError(f"{what}: the prompt has {len(ids)} tokens, more than data.max_prompt_len={limit} "
                        "(data.truncation=error; set data.truncation=left or right, or a larger data.max_prompt_len)")
    raise UserError(f"data.truncation={truncation!r} is not one of 'left', 'right', 'error'")
