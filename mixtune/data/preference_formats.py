"""Preference row formats, normalised to one shape: a prompt conversation and two assistant replies.

    preference  {"prompt": str | messages, "chosen": str | [assistant], "rejected": str | [assistant]}
                A string prompt is one user turn. TRL's "implicit prompt" rows are accepted too: no
                prompt (or a string one), and chosen/rejected are whole conversations; their shared
                leading turns are the prompt and each must differ only in its final assistant turn.
    hh          Anthropic HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...};
                split into turns at the "Human:" / "Assistant:" markers, each turn stripped; the turns
                both transcripts share are the prompt, their last assistant turns are the replies.

The prompt follows the SFT conversation rules but ends on a user turn. A pair is bad when a field is
missing, a reply is empty, the replies are identical, or the two transcripts part before the last turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mixtune.data.formats import Message, check_messages, check_text, json_type, require
from mixtune.data.problems import RowProblem

# A speaker marker of an HH transcript. The colon must be followed by whitespace or the end of the
# text: a transcript that ends in "\n\nAssistant:" has an empty last turn, which must show up as such.
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):(?=\s|$)")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    """One normalised preference row and where it came from."""

    where: str
    prompt: list[Message]
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, Any]:
        """TRL's conversational preference shape (the shape of the processed pref_*.jsonl files)."""
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def to_pair(where: str, row: Any, fmt: str) -> PreferencePair:
    """Normalise one row of format `fmt` ("preference" or "hh"); raises `RowProblem` for a bad pair."""
    if not isinstance(row, dict):
        raise RowProblem("not_an_object", f"row is a JSON {json_type(row)}, not an object")
    chosen, rejected = require(row, "chosen"), require(row, "rejected")
    if fmt == "hh":
        prompt, chosen, rejected = _split_pair(_hh_turns("chosen", chosen), _hh_turns("rejected", rejected))
    elif _is_conversation(chosen) or _is_conversation(rejected):
        prompt, chosen, rejected = _split_pair(_messages("chosen", chosen), _messages("rejected", rejected))
    else:
        prompt = _prompt(require(row, "prompt"))
        chosen, rejected = _reply("chosen", chosen), _reply("rejected", rejected)
    return PreferencePair(where, check_messages(prompt, last_role="user"), *_check_replies(chosen, rejected))


def split_hh_transcript(text: str) -> list[Message]:
    """The turns of one HH transcript, stripped, as role/content messages (unvalidated).

    Raises `RowProblem` when text other than whitespace comes before the first speaker marker.
    """
    # Some copies drop the leading blank line ("Human: hi..."); put it back so the first marker matches.
    parts = _HH_MARKER.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise RowProblem("bad_transcript", f"text before the first 'Human:' marker: {parts[0][:60]!r}")
    return [
        {"role": _HH_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _hh_turns(field: str, text: Any) -> list[Message]:
    if not isinstance(text, str):
        raise RowProblem("non_string_content", f"{field} is not a transcript string")
    return split_hh_transcript(text)


def _split_pair(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], Any, Any]:
    """Shared leading turns -> prompt; what is left of each side must be exactly one assistant turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same(chosen[shared], rejected[shared]):
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise RowProblem("identical_responses", "chosen and rejected are the same conversation")
    if shared == 0:
        raise RowProblem("missing_field", "no 'prompt' field and no turns shared by chosen and rejected")
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise RowProblem(
            "diverge_early",
            f"chosen and rejected part at turn {shared} of {len(chosen)}/{len(rejected)}, before the last turn",
        )
    return chosen[:shared], _reply("chosen", chosen[shared:]), _reply("rejected", rejected[shared:])


def _prompt(prompt: Any) -> Any:
    """A string prompt is one user turn; a message list is used as it is (checked by the caller)."""
    return [{"role": "user", "content": check_text("prompt", prompt)}] if isinstance(prompt, str) else prompt


def _reply(field: str, reply: Any) -> Any:
    """A reply: a string, or a list holding exactly one assistant message."""
    if isinstance(reply, str):
        return reply
    if not (isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict)):
        raise RowProblem("bad_completion", f"{field} must be a string or a list of one assistant message")
    if reply[0].get("role") != "assistant":
        raise RowProblem("bad_completion", f"{field} is from {reply[0].get('role')!r}, expected 'assistant'")
    return reply[0].get("content")


def _messages(field: str, value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise RowProblem("bad_completion", f"{field} is not a conversation, but the other reply is one")
    return check_messages(value, last_role="assistant")


def _check_replies(chosen: Any, rejected: Any) -> tuple[str, str]:
    chosen = check_text("chosen", chosen, empty_reason="empty_response")
    rejected = check_text("rejected", rejected, empty_reason="empty_response")
    if chosen == rejected:
        raise RowProblem("identical_responses", "chosen and rejected are identical")
    return chosen, rejected


def _is_conversation(value: Any) -> bool:
    """A whole conversation (implicit prompt) rather than a one-message reply."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and value[0].get("role") != "assistant"
    )


def _same(a: Message, b: Message) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]
