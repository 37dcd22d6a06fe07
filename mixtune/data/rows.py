"""One source's rows, normalised, with every bad row stopped on or counted: `read_rows`.

This is the tokenizer-free half of the pipeline, shared by the SFT and preference builders and by tools
that only need the rows (a pre-flight check, data analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mixtune.data.formats import PREFERENCE_FORMATS, SFT_FORMATS, Conversation, detect_format, to_conversation
from mixtune.data.preference_formats import PreferencePair, to_pair
from mixtune.data.problems import DataError, RowProblem, SourceReport
from mixtune.data.sources import RawRow, read_source

Stage = Literal["sft", "dpo"]
STAGE_FORMATS = {"sft": SFT_FORMATS, "dpo": PREFERENCE_FORMATS}
ON_BAD_ROW = ("error", "skip")


@dataclass
class SourceRows:
    """The usable rows of one source (`Conversation`s for SFT, `PreferencePair`s for DPO) and its report."""

    rows: list[Conversation] | list[PreferencePair]
    report: SourceReport


def read_rows(
    source: Any, stage: Stage = "sft", on_bad_row: str = "error", role: str = "train"
) -> SourceRows:
    """Read and normalise the rows of one `DataSource` (path, format, split, subset, limit, weight).

    `format: auto` takes the format from the first row whose keys name one; every row is then read in
    that format, and a row that does not fit it is a bad row. Bad rows raise `DataError` ("file:line:
    problem") with `on_bad_row="error"`, and are counted in the report with "skip". The skip threshold
    is not applied here (the builders apply it once tokenisation problems are counted too).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"data.on_bad_row: {on_bad_row!r} is not one of {ON_BAD_ROW}")
    raw = list(read_source(source))
    if not raw:  # an empty file in a mixture would otherwise just contribute nothing, unnoticed
        raise DataError(f"{source.path}: no rows to read")
    fmt = _resolve_format(source, raw, stage)
    report = SourceReport(source.path, role, fmt, getattr(source, "weight", 1.0), read=len(raw))
    normalise = to_conversation if stage == "sft" else to_pair
    rows = []
    for row in raw:
        try:
            if row.error is not None:
                raise RowProblem("malformed_json", row.error)
            rows.append(normalise(row.where, row.value, fmt))
        except RowProblem as problem:
            report.bad_row(row.where, problem, on_bad_row)
    return SourceRows(rows, report)


def _resolve_format(source: Any, raw: list[RawRow], stage: Stage) -> str:
    """The source's format: as given, or detected from its first recognisable row; checked against the stage."""
    fmt = source.format
    if fmt == "auto":
        found = next(((r, f) for r in raw if (f := detect_format(r.value)) is not None), None)
        if found is None:
            keys = next((sorted(r.value) for r in raw if isinstance(r.value, dict)), None)
            raise DataError(
                f"{source.path}: cannot tell the data format: no row has the keys of a known format "
                f"(first object's keys: {keys}); set the source's format to one of {STAGE_FORMATS[stage]}"
            )
        first, fmt = found
        where = f" (detected from {first.where})"
    else:
        where = ""
    if fmt not in STAGE_FORMATS[stage]:
        need = "SFT needs" if stage == "sft" else "DPO needs"
        raise DataError(
            f"{source.path}: format {fmt!r}{where} cannot be used for {stage.upper()}; "
            f"{need} one of {STAGE_FORMATS[stage]}"
        )
    return fmt
