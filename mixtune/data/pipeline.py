"""From a data section to train and eval examples: the steps SFT and DPO share.

    read + normalise every source (bad rows stopped on or counted)       rows.read_rows
    mix train sources by weight, split off eval (whole rows)              mixture
    encode each distinct chosen row once; apply the overlong policy       the stage's `encode`
    assemble examples, apply the skip threshold, refuse an empty result

The stage supplies `encode(row, truncate) -> Encoded`, which raises `RowProblem` for a bad row and
`Overlong` for a row over max_length that it may not truncate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixtune.data.mixture import Key, mix, split_eval
from mixtune.data.problems import DataError, DataReport, Overlong, RowProblem
from mixtune.data.rows import SourceRows, Stage, read_rows

OVERLONG = ("truncate", "drop", "error")


@dataclass
class Encoded:
    """One encoded row: its dataset columns, and whether truncation cut it."""

    columns: dict[str, Any]
    truncated: bool = False


Encoder = Callable[[Any, bool], Encoded]


def build_examples(data: Any, stage: Stage, encode: Encoder) -> tuple[list[dict], list[dict], DataReport]:
    """(train examples, eval examples, report) for a `DataSection`; eval is empty when none is asked for."""
    if data.overlong not in OVERLONG:
        raise DataError(f"data.overlong: {data.overlong!r} is not one of {OVERLONG}")
    if data.eval and data.eval_fraction:
        raise DataError(
            "data.eval and data.eval_fraction are both set; use one way of getting evaluation data"
        )
    train = [read_rows(s, stage, data.on_bad_row, "train") for s in data.train]
    evals = [read_rows(s, stage, data.on_bad_row, "eval") for s in data.eval]
    report = DataReport(
        stage, data.max_length, data.overlong, data.on_bad_row, [s.report for s in train + evals]
    )

    train_keys, held_keys = split_eval(_mix(train, data.seed, "train"), data.eval_fraction, data.seed)
    train_examples = _examples(train, train_keys, "train_examples", data, encode)
    if evals:
        eval_examples = _examples(evals, _mix(evals, data.seed, "eval"), "eval_examples", data, encode)
    else:
        eval_examples = _examples(train, held_keys, "eval_examples", data, encode)

    report.check_skips(data.max_skip_fraction)
    if not train_examples:
        raise DataError(f"no training examples left after filtering.\n{report.summary()}")
    if (data.eval or data.eval_fraction) and not eval_examples:
        raise DataError(f"no evaluation examples left after filtering.\n{report.summary()}")
    return train_examples, eval_examples, report


def _mix(sources: list[SourceRows], seed: int, role: str) -> list[Key]:
    reports = [s.report for s in sources]
    return mix(
        [r.source for r in reports], [len(s.rows) for s in sources], [r.weight for r in reports], seed, role
    )


def _examples(
    sources: list[SourceRows], keys: list[Key], counter: str, data: Any, encode: Encoder
) -> list[dict]:
    """Encode each distinct key once (copies share the result) and count examples per source."""
    # In file order, so that the first bad row reported is the first one in the file.
    encoded = {key: _encode_one(sources[key[0]], key[1], data, encode) for key in sorted(set(keys))}
    examples = []
    for key in keys:
        if (columns := encoded[key]) is not None:
            examples.append(columns)
            report = sources[key[0]].report
            setattr(report, counter, getattr(report, counter) + 1)
    return examples


def _encode_one(source: SourceRows, number: int, data: Any, encode: Encoder) -> dict | None:
    """Columns of one row, or None when it is skipped (bad) or dropped (over-long); counted either way."""
    row, report = source.rows[number], source.report
    report.used += 1
    try:
        result = encode(row, data.overlong == "truncate")
    except RowProblem as problem:
        report.bad_row(row.where, problem, data.on_bad_row)
        return None
    except Overlong as e:
        if data.overlong == "error":
            raise DataError(f"{row.where}: {e} (set data.overlong: truncate or drop to allow it)") from None
        report.dropped_overlong += 1
        return None
    report.kept += 1
    report.truncated += result.truncated
    return result.columns
