"""Chat rendering with the real SmolLM2 tokenizer: assistant-only masks, and their shift into packed loss masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xlstm_distill.data import PackedDataset, Source, encode_chat, encode_text

CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "4 × 3 = 12, so the answer is 12."},
]


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    from xlstm_distill.teacher import resolve_teacher

    folder, gguf = resolve_teacher("smollm2-135m")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def test_assistant_mask_covers_exactly_assistant_tokens(tokenizer) -> None:
    ids, mask = encode_chat(tokenizer, CHAT, loss_on="assistant")
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]  # same tokens as the template itself gives
    assert len(mask) == len(ids)
    trained = "".join(tokenizer.decode([t]) for t, m in zip(ids, mask) if m)
    end = tokenizer.eos_token  # <|im_end|> closes every turn
    assert trained == "".join(m["content"] + end + "\n" for m in CHAT if m["role"] == "assistant")
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "What is 2 + 2?" in untrained and "And times three?" in untrained
    assert untrained.endswith("<|im_start|>assistant\n")  # the generation prompt is given, not learned

    all_ids, all_mask = encode_chat(tokenizer, CHAT, loss_on="all")
    assert all_ids == ids and all(all_mask)


def test_packed_loss_mask_trains_only_assistant_targets(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(4)))
    ids, mask = encode_chat(tokenizer, CHAT, loss_on="assistant")
    L = len(ids)
    ex = next(iter(PackedDataset(Source(path, loss_on="assistant"), tokenizer, L + 20, loop=False)))
    # first segment = one whole chat: trained targets are exactly its assistant tokens, in order
    assert ex["document_ids"][:L].eq(0).all() and ex["document_ids"][L:].eq(1).all()
    assert ex["position_ids"][L] == 0 and ex["position_ids"][L - 1] == L - 1
    targets = ex["input_ids"][1:L][ex["loss_mask"][: L - 1]].tolist()
    assert targets == [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert not ex["loss_mask"][L - 1]  # the chat's last token predicts nothing (the next chat starts)
    # the second (cut) segment trains the assistant tokens that fit, the pack's last column trains nothing
    assert not ex["loss_mask"][-1]
    assert ex["loss_mask"][L:-1].tolist() == mask[1:20]


def test_sharegpt_style_conversations_and_text(tokenizer) -> None:
    from xlstm_distill.data.sources import to_document

    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    kind, messages = to_document(record, Source(lambda: []), 0)
    assert kind == "chat" and [m["role"] for m in messages] == ["user", "assistant"]
    ids, mask = encode_text(tokenizer, "Hello world")
    assert ids[-1] == tokenizer.eos_token_id and all(mask)
    assert torch.tensor(ids).dtype == torch.int64


def test_tokenizer_without_chat_template_trains_on_a_plain_transcript(tokenizer) -> None:
    """A base model's tokenizer (no chat template, as Gemma 3 270M's): chats become ``Role: content`` transcripts after
    the BOS token, and assistant-only targets still cover exactly the assistant turns."""
    import copy

    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    ids, mask = encode_chat(base, CHAT, loss_on="assistant")
    text = "User: What is 2 + 2?\n\nAssistant: 2 + 2 = 4.\n\nUser: And times three?\n\n" \
           "Assistant: 4 × 3 = 12, so the answer is 12.\n\n"
    assert ids == base((base.bos_token or "") + text, add_special_tokens=False)["input_ids"]
    trained = base.decode([t for t, m in zip(ids, mask) if m])
    assert trained == " 2 + 2 = 4.\n\n 4 × 3 = 12, so the answer is 12.\n\n"
    assert encode_chat(base, CHAT, loss_on="all")[0] == ids
