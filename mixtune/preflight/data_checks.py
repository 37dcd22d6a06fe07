"""Checks on the recipe's data: it loads (bad rows counted, not fatal), and its chat encoding round-trips."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtune.chat_format import encode_chat
from mixtune.data import Conversation, build_preference_datasets, build_sft_datasets, read_rows
from mixtune.recipe import Recipe
from mixtune.tokenizer import load_tokenizer, save_tokenizer
from mixtune.train.model_loading import tokenizer_source

from .report import Report

TEMPLATE_ROWS = 8  # real rows pushed through the chat template


@dataclass
class LoadedData:
    """What later checks reuse: the tokenizer and the training examples."""

    tokenizer: Any
    train: Any


def check_data(report: Report, recipe: Recipe) -> LoadedData | None:
    """Build the stage's datasets with bad rows counted (on_bad_row: skip, no threshold) and judge them."""
    try:
        tokenizer = load_tokenizer(tokenizer_source(recipe.model))
    except Exception as err:
        report.fail("tokenizer", str(err))
        return None
    counting = dataclasses.replace(recipe.data, on_bad_row="skip", max_skip_fraction=1.0)
    builder = build_sft_datasets if recipe.stage == "sft" else build_preference_datasets
    try:
        train, evals, data_report = builder(counting, tokenizer)
    except Exception as err:  # DataError, and hub or file errors for sources that cannot be reached
        report.fail("data", f"{type(err).__name__}: {err}")
        return None
    read = sum(s.read for s in data_report.sources)
    skipped = sum(data_report.skipped.values())
    text = (
        f"{read} rows read from {len(data_report.sources)} source(s) -> {len(train)} train / "
        f"{len(evals) if evals is not None else 0} eval examples; {skipped} bad rows, "
        f"{data_report.dropped_overlong} dropped over-long, {data_report.truncated} truncated "
        f"(max_length {recipe.data.max_length})"
    )
    over = [s for s in data_report.sources if s.read and s.n_skipped > recipe.data.max_skip_fraction * s.read]
    if skipped:
        first = next(s.examples[0] for s in data_report.sources if s.examples)
        reasons = ", ".join(f"{reason} {n}" for reason, n in data_report.skipped.most_common())
        text += f"\nby reason: {reasons}; first: {first}"
    if skipped and recipe.data.on_bad_row == "error":
        report.fail("data", text + "\ndata.on_bad_row is error: training stops at the first bad row")
    elif over:
        report.fail(
            "data",
            text + f"\nover data.max_skip_fraction {recipe.data.max_skip_fraction:g} in {over[0].source}",
        )
    elif skipped or data_report.dropped_overlong:
        report.warn("data", text)
    else:
        report.passed("data", text)
    return LoadedData(tokenizer, train)


def sample_messages(recipe: Recipe) -> list[list[dict[str, str]]]:
    """A few real conversations of the first training source (a pair as prompt + chosen answer)."""
    source = recipe.data.train[0]
    source = dataclasses.replace(source, limit=min(source.limit or TEMPLATE_ROWS, TEMPLATE_ROWS))
    rows = read_rows(source, recipe.stage, on_bad_row="skip").rows
    return [
        row.messages
        if isinstance(row, Conversation)
        else [*row.prompt, {"role": "assistant", "content": row.chosen}]
        for row in rows
    ]


def check_chat_template(report: Report, recipe: Recipe, tokenizer: Any) -> None:
    """AutoTokenizer loaded from a saved tokenizer directory must give mixtune.chat_format's ids."""
    from transformers import AutoTokenizer

    try:
        conversations = sample_messages(recipe)
    except Exception as err:
        report.fail("chat template", f"could not read sample rows: {err}")
        return
    source = tokenizer_source(recipe.model)
    with tempfile.TemporaryDirectory() as tmp:
        # The directory a run will save (and an export will ship): the model's own, or a fresh save.
        if source and (Path(source) / "tokenizer_config.json").is_file():
            directory = Path(source)
        else:
            directory = Path(tmp)
            save_tokenizer(tokenizer, directory)
        try:
            auto = AutoTokenizer.from_pretrained(directory, mode="finetuning")
            for messages in conversations:
                want = encode_chat(tokenizer, messages).input_ids
                got = list(auto.apply_chat_template(messages, tokenize=True, return_dict=False))
                if got != want:
                    at = next(
                        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                        min(len(got), len(want)),
                    )
                    report.fail(
                        "chat template",
                        f"AutoTokenizer({directory}) differs from mixtune.chat_format at token {at} "
                        f"({len(got)} vs {len(want)} ids) on a {len(messages)}-message conversation",
                    )
                    return
        except Exception as err:
            report.fail("chat template", f"{type(err).__name__}: {err}")
            return
    report.passed(
        "chat template",
        f"{len(conversations)} real conversations: AutoTokenizer ({type(auto).__name__}) chat template gives "
        "exactly mixtune.chat_format's Mixtral v1 ids",
    )
