"""A domain file -> token id sequences in the Mixtral v1 chat format, as the model sees them in training.

Any file mixtune's data pipeline reads works: SFT conversations (messages, Alpaca, ShareGPT) are
encoded whole; preference rows (prompt/chosen/rejected, HH transcripts) as the prompt followed by
the chosen answer. Bad rows are skipped and counted, as `data.on_bad_row: skip` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixtune.chat_format import ChatFormatError, encode_chat, encode_completion, encode_prompt
from mixtune.data import Conversation, DataError, read_rows
from mixtune.recipe.schema import DataSource


@dataclass
class Domain:
    """A named set of sequences; `skipped` counts rows that could not be read or encoded."""

    name: str
    path: str
    kind: str  # "sft" or "dpo"
    sequences: list[list[int]]
    skipped: int


def parse_domain(text: str) -> tuple[str, str]:
    """NAME=FILE -> (name, file); a bare FILE is named after its stem."""
    name, sep, path = text.partition("=")
    return (name, path) if sep else (Path(text).stem, text)


def load_domain(name: str, path: str, tokenizer, limit: int | None = None, max_length: int = 512) -> Domain:
    """Read up to `limit` rows of `path` (SFT first, then preference formats) and encode them."""
    source = DataSource(path=path, limit=limit)
    try:
        rows, kind = read_rows(source, "sft", on_bad_row="skip"), "sft"
    except DataError as sft_error:
        try:
            rows, kind = read_rows(source, "dpo", on_bad_row="skip"), "dpo"
        except DataError:
            raise sft_error from None
    sequences, skipped = [], rows.report.n_skipped
    for row in rows.rows:
        try:
            if isinstance(row, Conversation):
                ids = encode_chat(tokenizer, row.messages).input_ids
            else:
                ids = encode_prompt(tokenizer, row.prompt) + encode_completion(tokenizer, row.chosen)
        except ChatFormatError:
            skipped += 1
            continue
        sequences.append(ids[:max_length])
    return Domain(name, path, kind, sequences, skipped)
