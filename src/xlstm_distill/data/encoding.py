"""Tokenize documents with the teacher tokenizer: plain text, or chats rendered with the tokenizer's chat template
(a base model's tokenizer has none: its chats are plain transcripts, ``User: ...`` / ``Assistant: ...``).

Each document becomes ``(ids, target_mask)``: ``target_mask[i]`` says whether token ``i`` may be a training target
(the token predicted from position ``i - 1``). Plain text: all True. Chats with ``loss_on="assistant"``: True exactly
on the tokens of the assistant turns (content and end-of-turn marker, not the ``<|im_start|>assistant`` header that
the generation prompt supplies at inference).
"""

from __future__ import annotations

from typing import Any

Document = tuple[list[int], list[bool]]


def encode_text(tokenizer: Any, text: str, add_eos: bool = True) -> Document:
    """Token ids of a plain-text document (tokenizer's own special tokens, e.g. BOS) plus EOS if missing."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, [True] * len(ids)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat as text, through the tokenizer's chat template, or as a plain transcript for a tokenizer without one
    (:func:`plain_transcript`)."""
    if not getattr(tokenizer, "chat_template", None):
        return plain_transcript(messages, add_generation_prompt, bos=getattr(tokenizer, "bos_token", None))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def plain_transcript(messages: list[dict[str, str]], add_generation_prompt: bool = False, bos: str | None = None) -> str:
    """A chat for a base model (no chat template): the tokenizer's BOS token, then ``Role: content`` turns separated by
    blank lines; the generation prompt is ``Assistant:``. Every prefix of a chat renders as a prefix of its text, so
    assistant-only targets work too."""
    turns = "".join(f"{message['role'].capitalize()}: {message['content']}\n\n" for message in messages)
    return (bos or "") + turns + ("Assistant:" if add_generation_prompt else "")


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered chat) that the assistant writes.

    Assistant turn ``i`` spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
    ``render(messages[:i + 1])``; the template must render every prefix of the chat as a prefix of the full text.
    """
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        after = render_chat(tokenizer, messages[: i + 1])
        if i and not (after.startswith(before) and text.startswith(after)):
            raise ValueError(
                "The chat template does not render a prefix of the chat as a prefix of the full text, so assistant "
                "turns cannot be located; use loss_on='all' for this tokenizer."
            )
        start = len(before) if i else after.rfind(msg["content"])
        spans.append((start, len(after)))
    return spans


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], loss_on: str = "all") -> Document:
    """Token ids of a chat rendered with the chat template, and its target mask (all, or assistant tokens only)."""
    text = render_chat(tokenizer, messages)
    if loss_on == "all":
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, [True] * len(ids)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("loss_on='assistant' needs a fast tokenizer (character offsets); this one is not.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_char_spans(tokenizer, messages, text)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
