"""Reading one data source into raw rows, each tagged with where it came from.

A source is a local file (.jsonl, .json, .parquet), a local dataset directory, or a Hugging Face dataset
id. Every row carries its provenance for messages:
    "data.jsonl:17"            line 17 of a JSONL file (1-based, as editors count)
    "data.json#17"             row index 17 of a JSON list, a Parquet file or a dataset (0-based)
    "org/name[train]#17"       row 17 of a dataset split (subset shown as org/name:subset[train]#17)
A JSONL line that does not parse is still a row (a bad one, for the bad-row accounting to count or stop
on); a .json or .parquet file that does not parse is unusable as a whole and raises `DataError`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtune.data.problems import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RawRow:
    """One row as read: the parsed value (of any JSON type), or the reason it could not be parsed."""

    where: str
    value: Any = None
    error: str | None = None


def is_local(path: str) -> bool:
    """Local files and directories; anything else is a hub id (the recipe loader uses the same rule)."""
    return (
        path.startswith(("./", "../", "/", "~"))
        or path.lower().endswith(LOCAL_SUFFIXES)
        or Path(path).exists()
    )


def read_source(source: Any) -> Iterator[RawRow]:
    """Rows of a `DataSource` (path, split, subset, limit), in file order; at most `limit` of them."""
    rows = (
        _read_local(source) if is_local(source.path) else _read_hub(source.path, source.subset, source.split)
    )
    return itertools.islice(rows, source.limit)


def _read_local(source: Any) -> Iterator[RawRow]:
    path = Path(source.path).expanduser()
    if path.is_dir():  # a dataset saved or cloned to disk: datasets knows its layout
        return _read_hub(str(path), source.subset, source.split)
    if not path.is_file():
        raise DataError(f"{source.path}: no such data file (looked for {path.absolute()})")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{source.path}: unsupported file type {path.suffix!r}; use {', '.join(readers)}")
    return reader(source.path)


def _read_jsonl(path: str) -> Iterator[RawRow]:
    # Line by line rather than through `datasets`: a bad line must become one counted bad row naming its
    # line number, not an Arrow error about the whole file.
    with Path(path).expanduser().open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8-sig")  # -sig: a BOM some editors write is not part of the JSON
            except UnicodeDecodeError as e:
                yield RawRow(where, error=f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():  # a blank line (often the last one) holds no row
                continue
            try:
                yield RawRow(where, json.loads(text))
            except json.JSONDecodeError as e:
                yield RawRow(where, error=f"malformed JSON: {e.msg} (column {e.colno})")


def _read_json(path: str) -> Iterator[RawRow]:
    try:
        with Path(path).expanduser().open(encoding="utf-8-sig") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON file: {e}") from None
    rows = _json_rows(path, data)
    return (RawRow(f"{path}#{i}", value) for i, value in enumerate(rows))


def _json_rows(path: str, data: Any) -> list:
    """The row list of a .json file: the file itself, or the one list-valued field of an object."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        found = f"list fields {lists}" if lists else "no list field"
        raise DataError(
            f"{path}: expected a JSON list of rows, or an object with one list field; found {found}"
        )
    raise DataError(f"{path}: expected a JSON list of rows, found a JSON {type(data).__name__}")


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # datasets depends on pyarrow; imported here to keep start-up light

    try:
        batches = pq.ParquetFile(Path(path).expanduser()).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        yield from (RawRow(f"{path}#{i}", value) for i, value in enumerate(rows))
    except OSError as e:  # pyarrow's ArrowInvalid (a corrupt or non-Parquet file) is an OSError
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def _read_hub(path: str, subset: str | None, split: str) -> Iterator[RawRow]:
    dataset = load_hub_dataset(path, subset, split)
    name = f"{path}:{subset}" if subset else path
    return (RawRow(f"{name}[{split}]#{i}", value) for i, value in enumerate(dataset))


def load_hub_dataset(path: str, subset: str | None, split: str) -> Any:
    """`datasets.load_dataset(path, subset, split=split)`, with errors that name the dataset."""
    import datasets

    what = f"dataset {path!r}" + (
        f" (subset {subset!r}, split {split!r})" if subset else f" (split {split!r})"
    )
    try:
        return datasets.load_dataset(path, subset, split=split)
    except ConnectionError as e:
        # Offline (HF_HUB_OFFLINE) or no network, and not in the local cache: datasets raises from deep
        # inside its resolver, so say plainly what is missing and how to get it.
        raise DataError(
            f"{path}: cannot load hub {what}: no hub is reachable (offline mode or no network) and it is "
            f"not in the local datasets cache ({e}). Download it where the hub is reachable, or point the "
            "data source at a local .jsonl/.json/.parquet file."
        ) from None
    except Exception as e:  # unknown id, missing split or subset, unreadable files: all the user's to fix
        raise DataError(f"{path}: cannot load hub {what}: {type(e).__name__}: {e}") from None
