"""The Mixtral v1 instruct chat format, encoded token by token with a mask of the assistant's tokens.

This is the format mistral-common's `InstructTokenizerV1` produces:

    <s> [INST] user [/INST] assistant</s> [INST] user [/INST] assistant</s> ...

* Each user turn is one SentencePiece call on "[INST] " + content + " [/INST]", so its first piece
  is "▁[" even after a </s>.
* Each assistant turn is one call on its content, so the turn starts with the dummy-prefix "▁";
  then comes </s>.
* A system message is folded into the first user turn as system + "\\n\\n" + content.

Why this is written out here: mistral-common encodes a whole request into one flat list and
does not say which message each token came from, but training needs that in order to mask the
loss. These rules follow `InstructTokenizerV1`, and the tests check them against it on every real
conversation. Nothing here goes through a chat template. A rendered string is tokenised in one
piece, which is right only when the template puts every seam where SentencePiece would (a naive v1
template turns the "▁[" after </s> into "["), and a literal "</s>" inside a message would become EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation the Mixtral v1 format cannot encode. The message says what is wrong and at which message index."""


@dataclass(frozen=True)
class EncodedChat:
    """Ids of a whole conversation; `assistant_mask[i]` is True when `input_ids[i]` belongs to an assistant turn (its </s> included)."""

    input_ids: list[int]
    assistant_mask: list[bool]


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> EncodedChat:
    """Encode a training conversation: an optional system message, then user/assistant turns, ending with the assistant.

    Gives exactly mistral-common's v1 ids (length T), plus a mask of length T that is True
    on every token of every assistant turn, </s> included. It is False on <s>, on the
    "[INST] ... [/INST]" pieces and on the system text.
    """
    _check_messages(messages, last_role="assistant")
    return _encode_turns(tokenizer, messages)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Encode a conversation that ends with a user turn, ready for generation (no trailing </s>).

    `encode_prompt(p) + encode_completion(c)` equals `encode_chat(p + [assistant c]).input_ids`.
    """
    _check_messages(messages, last_role="user")
    return _encode_turns(tokenizer, messages).input_ids


def encode_completion(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode one assistant reply as it appears after a prompt: its own SentencePiece call, then </s>."""
    _check_content(text, "completion")
    return _encode_text(tokenizer, text) + [tokenizer.eos_token_id]


def _encode_turns(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> EncodedChat:
    input_ids, assistant_mask = [tokenizer.bos_token_id], [False]
    for role, text in _turns(messages):
        ids = encode_completion(tokenizer, text) if role == "assistant" else _encode_user(tokenizer, text)
        input_ids += ids
        assistant_mask += [role == "assistant"] * len(ids)
    return EncodedChat(input_ids, assistant_mask)


def _encode_user(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return _encode_text(tokenizer, f"[INST] {text} [/INST]")


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # load_tokenizer's backend passes text straight to SentencePiece: a literal "</s>" inside a
    # message stays text, as it does in mistral-common. It never becomes the EOS id.
    return tokenizer.encode(text, add_special_tokens=False)


def _turns(messages: list[dict[str, Any]]):
    """Yield (role, text) per user/assistant turn, with the system message folded into the first user turn."""
    system = None
    for message in messages:
        role, text = message["role"], message["content"]
        if role == "system":
            system = text
            continue
        if system is not None:
            text, system = f"{system}\n\n{text}", None
        yield role, text


def _check_messages(messages: Any, last_role: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(
            f"messages must be a non-empty list of {{role, content}} dicts, got {_show(messages)}"
        )
    first_turn = 0  # index of the first user turn: 1 when a system message comes first
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i}: expected a {{role, content}} dict, got {_show(message)}")
        role = message["role"]
        if role not in ROLES:
            raise ChatFormatError(
                f"message {i}: unknown role {role!r}; the Mixtral v1 format knows {', '.join(ROLES)}"
            )
        if message.get("tool_calls"):
            raise ChatFormatError(f"message {i}: the Mixtral v1 format has no tool calls")
        _check_content(message["content"], f"message {i} ({role})")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"message {i}: a system message must be the first message")
            first_turn = 1
            continue
        expected = "user" if (i - first_turn) % 2 == 0 else "assistant"
        if role != expected:
            raise ChatFormatError(
                f"message {i}: expected role {expected!r}, got {role!r}; after an optional system "
                "message, turns must alternate user, assistant, user, ..."
            )
    if messages[-1]["role"] != last_role:
        raise ChatFormatError(
            f"message {len(messages) - 1}: the last message must be from the {last_role}, got {messages[-1]['role']!r}"
        )


def _check_content(content: Any, where: str) -> None:
    if not isinstance(content, str):
        raise ChatFormatError(f"{where}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise ChatFormatError(f"{where}: content is empty")


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
