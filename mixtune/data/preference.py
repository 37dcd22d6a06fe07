"""Tokenised preference datasets for DPO: `build_preference_datasets(data_section, tokenizer)`.

Columns (one row per pair):
    prompt_ids    list[int]  chat_format.encode_prompt: <s>, the turns, ending "[/INST]"
    chosen_ids    list[int]  chat_format.encode_completion of the chosen reply, </s> included
    rejected_ids  list[int]  the same for the rejected reply
    where         str        provenance ("file.jsonl:17")

These are the names TRL 1.16's `DataCollatorForPreference` reads and `DPOTrainer` keeps as signature
columns. But DPOTrainer 1.16 has no "already tokenised" path: its `_prepare_dataset` always extracts a
prompt and re-tokenises the text with the tokenizer's chat template (and raises on a dataset without
`chosen`/`rejected` text). The DPO entry point must therefore skip that step for these datasets (a
subclass whose `_prepare_dataset` returns a dataset that already has `prompt_ids` unchanged).

Length: TRL has a single `max_length` and its collator cuts prompt + reply keeping the start. The same
cut is made here, on the replies only, so the collator has nothing left to cut when its `max_length`
equals data.max_length. A prompt is never cut (keep_end truncation would drop the start of the
conversation): a pair whose prompt leaves no room for a reply token is refused, dropped or counted bad,
as `overlong` says. Replies that become identical when cut are a bad pair: they carry no preference.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, Features, List, Value

from mixtune.chat_format import ChatFormatError, encode_completion, encode_prompt
from mixtune.data.pipeline import Encoded, build_examples
from mixtune.data.preference_formats import PreferencePair
from mixtune.data.problems import DataReport, Overlong, RowProblem

PREFERENCE_FEATURES = Features(
    {
        "prompt_ids": List(Value("int32")),
        "chosen_ids": List(Value("int32")),
        "rejected_ids": List(Value("int32")),
        "where": Value("string"),
    }
)


def build_preference_datasets(data: Any, tokenizer: Any) -> tuple[Dataset, Dataset | None, DataReport]:
    """(train, eval or None, report) of tokenised preference pairs for a `DataSection`.

    Raises `DataError` as `build_sft_datasets` does. Set DPOConfig.max_length to data.max_length.
    """

    def encode(row: PreferencePair, truncate: bool) -> Encoded:
        return encode_pair(tokenizer, row, data.max_length, truncate)

    train, evals, report = build_examples(data, "dpo", encode)
    has_eval = bool(data.eval or data.eval_fraction)
    return _dataset(train), (_dataset(evals) if has_eval else None), report


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int, truncate: bool) -> Encoded:
    """Prompt and reply ids of one pair, replies cut so prompt + reply fits `max_length` when allowed.

    Raises `Overlong` when the pair does not fit and may not be cut (or its prompt alone leaves no room
    under `overlong: drop`/`error`), and `RowProblem` for a prompt too long to keep under `truncate`, or
    replies made identical by the cut.
    """
    try:
        prompt = encode_prompt(tokenizer, pair.prompt)
        chosen, rejected = (
            encode_completion(tokenizer, pair.chosen),
            encode_completion(tokenizer, pair.rejected),
        )
    except ChatFormatError as e:  # the row checks should have caught it; report it as a bad row anyway
        raise RowProblem("chat_format", str(e)) from None
    room = max_length - len(prompt)
    if room < 1:  # as TRL's own filter: a reply needs at least one token after the prompt
        detail = (
            f"prompt is {len(prompt)} tokens, leaving no room for a reply in data.max_length {max_length}"
        )
        if truncate:
            raise RowProblem("prompt_too_long", detail + " (prompts are never cut)")
        raise Overlong(detail)
    cut = max(len(chosen), len(rejected)) > room
    if cut and not truncate:
        longest = len(prompt) + max(len(chosen), len(rejected))
        raise Overlong(f"pair is {longest} tokens (prompt {len(prompt)}), over data.max_length {max_length}")
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        if cut:
            raise RowProblem(
                "identical_after_truncation", f"chosen and rejected are the same in their first {room} tokens"
            )
        raise RowProblem("identical_responses", "chosen and rejected encode to the same tokens")
    columns = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "where": pair.where}
    return Encoded(columns, truncated=cut)


def _dataset(examples: list[dict]) -> Dataset:
    columns = {name: [example[name] for example in examples] for name in PREFERENCE_FEATURES}
    return Dataset.from_dict(columns, features=PREFERENCE_FEATURES)
