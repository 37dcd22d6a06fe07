"""SFT row formats, recognised and normalised to one shape: a list of {"role", "content"} messages.

    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    alpaca     {"instruction": str, "input": str (optional), "output": str}
               -> user = instruction, plus "\\n\\n" + input when input is not blank; assistant = output
    sharegpt   {"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...]}

Other keys of a row (ids, task names, answers) are ignored. A conversation is usable when it is an
optional system message, then user and assistant turns alternating from a user turn and ending on an
assistant turn, every content a non-blank string. Contents are kept exactly as written (no stripping):
what the data says is what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtune.data.problems import RowProblem

SFT_FORMATS = ("messages", "alpaca", "sharegpt")
PREFERENCE_FORMATS = ("preference", "hh")
ROLES = ("system", "user", "assistant")

# ShareGPT speaker names seen in the wild (FastChat, Vicuna and Bard/Bing scrapes) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}

Message = dict[str, str]


@dataclass(frozen=True)
class Conversation:
    """One normalised SFT row and where it came from."""

    where: str
    messages: list[Message]

    def to_dict(self) -> dict[str, Any]:
        """TRL's conversational language-modeling shape: {"messages": [...]}."""
        return {"messages": self.messages}


def detect_format(row: Any) -> str | None:
    """The format a row's keys suggest (SFT or preference), or None when they suggest none."""
    if not isinstance(row, dict):
        return None
    if "chosen" in row or "rejected" in row:
        # HH-RLHF keeps whole transcripts as strings and has no prompt field
        return "hh" if "prompt" not in row and isinstance(row.get("chosen"), str) else "preference"
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    return None


def to_conversation(where: str, row: Any, fmt: str) -> Conversation:
    """Normalise one row of format `fmt`; raises `RowProblem` when it is not a usable conversation."""
    if not isinstance(row, dict):
        raise RowProblem("not_an_object", f"row is a JSON {json_type(row)}, not an object")
    readers = {"messages": _from_messages, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt}
    messages = readers[fmt](row)
    return Conversation(where, check_messages(messages, last_role="assistant"))


def check_messages(messages: Any, last_role: str) -> list[Message]:
    """Validate a role/content list and return a clean copy (role and content only).

    The rules are the Mixtral v1 chat format's: an optional system message first, then user and
    assistant alternating from user; `last_role` is "assistant" for SFT rows, "user" for DPO prompts.
    """
    if not isinstance(messages, list) or not messages:
        raise RowProblem(
            "malformed_message", f"expected a non-empty list of messages, got {_short(messages)}"
        )
    clean = [_check_message(i, m) for i, m in enumerate(messages)]
    first = 1 if clean[0]["role"] == "system" else 0
    for i in range(first, len(clean)):
        role = clean[i]["role"]
        if role == "system":
            raise RowProblem("system_not_first", f"message {i} is a system message; only the first may be")
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role != expected:
            raise RowProblem(
                "roles_not_alternating",
                f"message {i} is from {role!r}, expected {expected!r} (turns alternate, user first)",
            )
    if clean[-1]["role"] != last_role:
        reason = "last_not_assistant" if last_role == "assistant" else "prompt_last_not_user"
        raise RowProblem(reason, f"the last message is from {clean[-1]['role']!r}, expected {last_role!r}")
    return clean


def _check_message(index: int, message: Any) -> Message:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise RowProblem(
            "malformed_message", f"message {index} is not an object with role and content: {_short(message)}"
        )
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise RowProblem(
            "unknown_role", f"message {index} has unknown role {role!r}; expected one of {ROLES}"
        )
    check_text(f"message {index} content", content)
    return {"role": role, "content": content}


def check_text(what: str, text: Any, empty_reason: str = "empty_content") -> str:
    """A content string must be a string with something besides whitespace in it."""
    if not isinstance(text, str):
        raise RowProblem("non_string_content", f"{what} is a JSON {json_type(text)}, not a string")
    if not text.strip():
        raise RowProblem(empty_reason, f"{what} is empty")
    return text


def require(row: dict, key: str) -> Any:
    """A row's field, or a `missing_field` problem that lists the keys the row does have."""
    if key not in row or row[key] is None:  # None: a column absent from this row of a Parquet/hub table
        raise RowProblem("missing_field", f"no {key!r} field (row keys: {sorted(row)})")
    return row[key]


def _from_messages(row: dict) -> Any:
    return require(row, "messages")


def _from_alpaca(row: dict) -> list[Message]:
    instruction = check_text("instruction", require(row, "instruction"))
    output = check_text("output", require(row, "output"))
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowProblem("non_string_content", f"input is a JSON {json_type(extra)}, not a string")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_sharegpt(row: dict) -> list[Message]:
    turns = require(row, "conversations")
    if not isinstance(turns, list):
        raise RowProblem("malformed_message", f"conversations is a JSON {json_type(turns)}, not a list")
    return [_sharegpt_turn(i, turn) for i, turn in enumerate(turns)]


def _sharegpt_turn(index: int, turn: Any) -> Any:
    if not isinstance(turn, dict):
        return turn  # check_messages reports it
    if "role" in turn:  # some ShareGPT exports already use role/content
        return turn
    speaker = turn.get("from")
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise RowProblem(
            "unknown_role", f"turn {index} is from {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}"
        )
    return {"role": role, "content": turn.get("value")}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about rows."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
