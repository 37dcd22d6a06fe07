"""The data pipeline: files and hub datasets in, tokenised SFT and DPO datasets out, every row accounted for.

    build_sft_datasets(data, tokenizer)        -> (train, eval | None, DataReport)   columns input_ids, labels
    build_preference_datasets(data, tokenizer) -> (train, eval | None, DataReport)   prompt_ids, chosen_ids, rejected_ids
    read_rows(source, stage, on_bad_row)       -> SourceRows: normalised rows + their SourceReport, no tokenizer

`data` is a recipe's `DataSection` and `source` one `DataSource` (any object with those attributes).
Module map: sources (reading, provenance), formats / preference_formats (row shapes), problems (bad-row
accounting), rows (one source normalised), mixture (weights, eval split), pipeline (the shared steps),
sft / preference (tokenisation and the datasets).
"""

from mixtune.data.formats import Conversation
from mixtune.data.preference import build_preference_datasets, encode_pair
from mixtune.data.preference_formats import PreferencePair, split_hh_transcript
from mixtune.data.problems import DataError, DataReport, SourceReport
from mixtune.data.rows import SourceRows, read_rows
from mixtune.data.sft import build_sft_datasets, encode_conversation

__all__ = [
    "Conversation",
    "DataError",
    "DataReport",
    "PreferencePair",
    "SourceReport",
    "SourceRows",
    "build_preference_datasets",
    "build_sft_datasets",
    "encode_conversation",
    "encode_pair",
    "read_rows",
    "split_hh_transcript",
]
