"""Tokenised SFT datasets: `build_sft_datasets(data_section, tokenizer)`.

Columns (one row per conversation):
    input_ids  list[int]  the Mixtral v1 chat encoding (chat_format.encode_chat), at most max_length ids
    labels     list[int]  the input id on assistant tokens (each reply and its </s>), -100 elsewhere
    where      str        provenance ("file.jsonl:17"), for messages about a sample

TRL 1.16's SFTTrainer takes a dataset with `input_ids` as already tokenised and a `labels` column as
final: it neither re-tokenises (which through a plain-text template would not give Mixtral v1 ids) nor
rebuilds the labels. Its own keep_start truncation and "drop fully masked rows" filter find nothing to
do, since rows arrive at most max_length long with a label each. Packing stays TRL's
(`packing=True`, strategy "bfd"): it keeps `input_ids` and `labels`, records each row's length, and its
padding-free collator restarts `position_ids` per row and un-labels each row's first token.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, Features, List, Value

from mixtune.chat_format import ChatFormatError, encode_chat
from mixtune.data.formats import Conversation
from mixtune.data.pipeline import Encoded, build_examples
from mixtune.data.problems import DataReport, Overlong, RowProblem

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy and TRL skip

SFT_FEATURES = Features(
    {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "where": Value("string")}
)


def build_sft_datasets(data: Any, tokenizer: Any) -> tuple[Dataset, Dataset | None, DataReport]:
    """(train, eval or None, report) for a `DataSection`, tokenised with the Mixtral v1 chat format.

    Raises `DataError` for a bad row (`on_bad_row: error`), too many skipped rows, an over-long row under
    `overlong: error`, or an empty result. Print `report.summary()` in the start-up banner.
    """

    def encode(row: Conversation, truncate: bool) -> Encoded:
        return encode_conversation(tokenizer, row, data.max_length, truncate)

    train, evals, report = build_examples(data, "sft", encode)
    has_eval = bool(data.eval or data.eval_fraction)
    return _dataset(train), (_dataset(evals) if has_eval else None), report


def encode_conversation(
    tokenizer: Any, conversation: Conversation, max_length: int, truncate: bool
) -> Encoded:
    """Token ids and labels of one conversation, cut to `max_length` when `truncate` allows.

    Raises `Overlong` when the row is longer than `max_length` and may not be cut, and `RowProblem`
    ("no_labels") when cutting leaves no assistant token: such a row teaches nothing.
    """
    try:
        encoded = encode_chat(tokenizer, conversation.messages)
    except ChatFormatError as e:  # the row checks should have caught it; report it as a bad row anyway
        raise RowProblem("chat_format", str(e)) from None
    ids = encoded.input_ids
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, encoded.assistant_mask, strict=True)]
    cut = len(ids) > max_length
    if cut and not truncate:
        raise Overlong(f"conversation is {len(ids)} tokens, over data.max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise RowProblem(
            "no_labels",
            f"the prompt alone fills data.max_length {max_length} ({len(encoded.input_ids)} tokens in all): "
            "no assistant token is left to learn from",
        )
    return Encoded({"input_ids": ids, "labels": labels, "where": conversation.where}, truncated=cut)


def _dataset(examples: list[dict]) -> Dataset:
    columns = {name: [example[name] for example in examples] for name in SFT_FEATURES}
    return Dataset.from_dict(columns, features=SFT_FEATURES)
