"""The SFT data pipeline: sources, formats, bad rows, lengths, mixtures, masking and TRL packing.

Bad rows are built in tiny temporary files; the formats are checked on the real files of
../shared/data (see its SOURCES.md) and on the embedded task data.
"""

from __future__ import annotations

import json
import re
import types
from collections import Counter
from pathlib import Path

import pytest

from mixtune.data import DataError, build_sft_datasets, read_rows
from mixtune.recipe.schema import DataSection, DataSource
from mixtune.tasks import TASK_FILES

IGNORE = -100
USER = {"role": "user", "content": "What is two plus two?"}
REPLY = {"role": "assistant", "content": "Four."}
GOOD = {"messages": [USER, REPLY]}


@pytest.fixture(scope="module")
def tokenizer():
    from mixtune.tokenizer import load_tokenizer

    return load_tokenizer()


def write_jsonl(path: Path, rows: list) -> str:
    """Rows as JSONL; a str row is written verbatim (to plant malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def section(*paths: str, **kwargs) -> DataSection:
    sources = [p if isinstance(p, DataSource) else DataSource(p) for p in paths]
    return DataSection(train=sources, **kwargs)


def numbered(n: int, tag: str = "q") -> list[dict]:
    """n distinct good rows, so that rows can be told apart after mixing."""
    return [{"messages": [{"role": "user", "content": f"{tag} {i}?"}, REPLY]} for i in range(n)]


def label_runs(labels: list[int]) -> list[list[int]]:
    """The contiguous labelled spans of one example."""
    runs, current = [], []
    for label in [*labels, IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs


# --- the real files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "rows"),
    [
        ("sft_gsm8k.jsonl", "messages", 2000),
        ("sft_gpteacher.jsonl", "messages", 2000),
        ("raw/fastchat_dummy_conversation_sharegpt.json", "sharegpt", 500),
    ],
)
def test_real_files_load_as_a_new_user_would(shared_data, tokenizer, name, fmt, rows):
    train, eval_, report = build_sft_datasets(section(str(shared_data / name)), tokenizer)
    assert eval_ is None
    assert len(train) == rows
    (source,) = report.sources
    assert (source.format, source.read, source.kept, source.n_skipped) == (fmt, rows, rows, 0)
    assert train.column_names == ["input_ids", "labels", "where"]
    assert all(len(ids) <= 1024 for ids in train["input_ids"])


def test_sharegpt_roles_and_provenance(shared_data):
    path = str(shared_data / "raw/fastchat_dummy_conversation_sharegpt.json")
    rows = read_rows(DataSource(path)).rows
    assert Counter(len(r.messages) for r in rows) == {2: 167, 4: 166, 6: 167}
    assert rows[0].where == f"{path}#0"
    assert rows[0].messages[0] == {"role": "user", "content": "Who are you?"}
    assert rows[0].messages[1]["role"] == "assistant"


def test_embedded_task_data_ignores_extra_keys(tokenizer):
    rows = read_rows(DataSource(str(TASK_FILES["sft_train"]))).rows
    assert len(rows) == 8000
    assert all(set(m) == {"role", "content"} for r in rows for m in r.messages)
    train, _, _ = build_sft_datasets(section(str(TASK_FILES["sft_train"]), max_length=64), tokenizer)
    assert len(train) == 8000


def test_labels_are_exactly_the_assistant_replies(shared_data, tokenizer):
    """Decode every labelled span: it must be one assistant reply, then </s>, in order."""
    for name in ("raw/fastchat_dummy_conversation_sharegpt.json", "sft_gsm8k.jsonl"):
        path = str(shared_data / name)
        conversations = {c.where: c for c in read_rows(DataSource(path, limit=200)).rows}
        train, _, _ = build_sft_datasets(section(DataSource(path, limit=200)), tokenizer)
        for example in train:
            replies = [
                m["content"] for m in conversations[example["where"]].messages if m["role"] == "assistant"
            ]
            runs = label_runs(example["labels"])
            assert [run[-1] for run in runs] == [tokenizer.eos_token_id] * len(replies)
            # skip_special_tokens: without it this backend decodes to raw pieces ("▁My▁name")
            assert [tokenizer.decode(run[:-1], skip_special_tokens=True) for run in runs] == replies
            assert example["input_ids"][0] == tokenizer.bos_token_id
            assert example["input_ids"].count(tokenizer.bos_token_id) == 1  # no double BOS


# --- formats -----------------------------------------------------------------------------------


def test_alpaca_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
            {"instruction": "Say hi.", "input": "", "output": "Hi"},
            {"instruction": "Say bye.", "output": "Bye"},
        ],
    )
    rows = read_rows(DataSource(path)).rows
    assert [r.messages[0]["content"] for r in rows] == ["Translate.\n\nBonjour", "Say hi.", "Say bye."]
    assert [r.messages[1] for r in rows] == [
        {"role": "assistant", "content": t} for t in ("Hello", "Hi", "Bye")
    ]
    assert read_rows(DataSource(path)).report.format == "alpaca"


@pytest.mark.parametrize(
    ("good", "bad", "missing"),
    [
        ({"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi", "input": "x"}, "output"),
        ({"instruction": "Hi", "output": "Hello"}, {"output": "Hello", "instruction": None}, "instruction"),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
            {"id": 3},
            "conversations",
        ),
    ],
)
def test_missing_fields_per_format(tmp_path, good, bad, missing):
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: no '{missing}' field .*\[missing_field\]"):
        read_rows(DataSource(path))


def test_sharegpt_speaker_names_and_system(tmp_path):
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "chatgpt", "value": "Hello"},
        {"from": "user", "value": "Bye"},
        {"from": "bard", "value": "Bye"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps({"data": [{"id": "x", "conversations": conv}]}))  # object with one list field
    (row,) = read_rows(DataSource(str(path))).rows
    assert [m["role"] for m in row.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_auto_detection_then_every_row_must_match(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", ["{oops", GOOD, {"instruction": "x", "output": "y"}])
    rows = read_rows(DataSource(path), on_bad_row="skip")
    assert rows.report.format == "messages"  # detected from line 2, the first recognisable row
    assert rows.report.skipped == {"malformed_json": 1, "missing_field": 1}
    assert len(rows.rows) == 1


def test_preference_file_is_refused_for_sft(shared_data):
    with pytest.raises(DataError, match="format 'preference'.*cannot be used for SFT"):
        read_rows(DataSource(str(shared_data / "pref_hh_harmless.jsonl"), limit=3))


def test_unrecognisable_file(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"cannot tell the data format.*\['text'\]"):
        read_rows(DataSource(path))


# --- bad rows: each one stops the build naming file:line, or is counted ------------------------

BAD_ROWS = {
    "malformed_json": '{"messages": [',
    "not_an_object": "[1, 2]",
    "missing_field": {"text": "hi"},
    "malformed_message": {"messages": ["hi", REPLY]},
    "unknown_role": {"messages": [{"role": "bot", "content": "hi"}, REPLY]},
    "system_not_first": {"messages": [USER, {"role": "system", "content": "x"}, REPLY]},
    "roles_not_alternating": {"messages": [USER, USER, REPLY]},
    "last_not_assistant": {"messages": [USER, REPLY, USER]},
    "empty_content": {"messages": [USER, {"role": "assistant", "content": "  "}]},
    "non_string_content": {"messages": [USER, {"role": "assistant", "content": 4}]},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_stops_the_build_naming_file_and_line(tmp_path, tokenizer, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, BAD_ROWS[reason], GOOD])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: .*\[{reason}\]"):
        build_sft_datasets(section(path), tokenizer)


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_is_counted_when_skipping(tmp_path, tokenizer, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, BAD_ROWS[reason], GOOD])
    train, _, report = build_sft_datasets(section(path, on_bad_row="skip", max_skip_fraction=0.5), tokenizer)
    assert len(train) == 3
    (source,) = report.sources
    assert (source.read, source.kept, source.skipped) == (4, 3, {reason: 1})
    assert source.examples[0].startswith(f"{path}:3: ")
    assert f"{reason} 1" in report.summary()


def test_json_file_rows_are_named_by_index(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, "not a row", GOOD]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}#1: row is a JSON string"):
        build_sft_datasets(section(str(path)), tokenizer)


def test_skips_over_the_threshold_fail_with_counts_and_examples(tmp_path, tokenizer):
    rows = numbered(18) + [BAD_ROWS["unknown_role"], BAD_ROWS["empty_content"]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as caught:
        build_sft_datasets(section(path, on_bad_row="skip", max_skip_fraction=0.05), tokenizer)
    message = str(caught.value)
    assert "2 of 20 rows (10.0%)" in message and "max_skip_fraction 0.05" in message
    assert "unknown_role 1" in message and "empty_content 1" in message
    assert f"{path}:19: " in message and f"{path}:20: " in message
    # at the threshold it passes
    train, _, _ = build_sft_datasets(section(path, on_bad_row="skip", max_skip_fraction=0.1), tokenizer)
    assert len(train) == 18


def test_threshold_applies_per_source(tmp_path, tokenizer):
    """A broken small source is not hidden by a large clean one."""
    clean = write_jsonl(tmp_path / "clean.jsonl", numbered(200))
    broken = write_jsonl(tmp_path / "broken.jsonl", [BAD_ROWS["unknown_role"]] + numbered(1))
    with pytest.raises(DataError, match="broken.jsonl: 1 of 2 rows"):
        build_sft_datasets(section(clean, broken, on_bad_row="skip"), tokenizer)


# --- lengths -----------------------------------------------------------------------------------


def long_rows(tmp_path: Path) -> str:
    """Line 1 fits in 32 tokens, line 2 has a long reply, line 3 a prompt longer than 32 tokens."""
    long_text = " ".join(["word"] * 60)
    return write_jsonl(
        tmp_path / "long.jsonl",
        [
            GOOD,
            {"messages": [USER, {"role": "assistant", "content": long_text}]},
            {"messages": [{"role": "user", "content": long_text}, REPLY]},
        ],
    )


def test_overlong_truncate_keeps_rows_with_labels_and_counts_them(tmp_path, tokenizer):
    path = long_rows(tmp_path)
    data = section(path, max_length=32, overlong="truncate", on_bad_row="skip", max_skip_fraction=0.5)
    train, _, report = build_sft_datasets(data, tokenizer)
    (source,) = report.sources
    # line 2 is cut to 32 tokens and kept; line 3 keeps no label once cut, so it is a bad row
    assert (source.kept, source.truncated, source.skipped) == (2, 1, {"no_labels": 1})
    assert sorted(w[-2:] for w in train["where"]) == [":1", ":2"]
    assert max(len(ids) for ids in train["input_ids"]) == 32
    assert all(any(label != IGNORE for label in labels) for labels in train["labels"])


def test_prompt_filling_max_length_is_a_bad_row(tmp_path, tokenizer):
    path = long_rows(tmp_path)
    with pytest.raises(
        DataError, match=rf"^{re.escape(path)}:3: the prompt alone fills data.max_length 32.*\[no_labels\]"
    ):
        build_sft_datasets(section(path, max_length=32), tokenizer)


def test_overlong_drop_counts_and_skips(tmp_path, tokenizer):
    train, _, report = build_sft_datasets(
        section(long_rows(tmp_path), max_length=32, overlong="drop"), tokenizer
    )
    (source,) = report.sources
    assert (len(train), source.kept, source.dropped_overlong, source.n_skipped) == (1, 1, 2, 0)
    assert "dropped over-long 2" in report.summary()


def test_overlong_error_names_the_row(tmp_path, tokenizer):
    path = long_rows(tmp_path)
    with pytest.raises(
        DataError, match=rf"^{re.escape(path)}:2: conversation is \d+ tokens, over data.max_length 32"
    ):
        build_sft_datasets(section(path, max_length=32, overlong="error"), tokenizer)


def test_empty_dataset_after_filtering(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"messages": [USER, {"role": "assistant", "content": "a " * 80}]}]
    )
    with pytest.raises(DataError, match="no training examples left"):
        build_sft_datasets(section(path, max_length=16, overlong="drop"), tokenizer)


# --- mixtures and splits -----------------------------------------------------------------------


def test_weights_subsample_and_repeat(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", numbered(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered(10, "b"))
    data = section(DataSource(a, weight=0.5), DataSource(b, weight=2.5))
    train, _, report = build_sft_datasets(data, tokenizer)
    per_file = Counter(w.rsplit(":", 1)[0] for w in train["where"])
    assert per_file == {a: 5, b: 25}
    copies = Counter(w for w in train["where"] if w.startswith(b))
    assert sorted(Counter(copies.values()).items()) == [
        (2, 5),
        (3, 5),
    ]  # every row twice, half of them thrice
    assert [s.train_examples for s in report.sources] == [5, 25]
    again, _, _ = build_sft_datasets(data, tokenizer)
    assert again["where"] == train["where"]  # seeded
    other, _, _ = build_sft_datasets(
        section(DataSource(a, weight=0.5), DataSource(b, weight=2.5), seed=7), tokenizer
    )
    assert other["where"] != train["where"]


def test_eval_fraction_splits_whole_rows_never_both_sides(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", numbered(50))
    data = section(DataSource(path, weight=2.0), eval_fraction=0.2)
    train, eval_, report = build_sft_datasets(data, tokenizer)
    assert len(eval_) == 10 and len(train) == 80  # 40 distinct rows, each twice
    assert not set(train["where"]) & set(eval_["where"])
    assert len(set(eval_["where"])) == 10
    assert (report.sources[0].train_examples, report.sources[0].eval_examples) == (80, 10)


def test_eval_sources_and_limit(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", numbered(30))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", numbered(30, "e"))
    data = DataSection(train=[DataSource(train_path, limit=12)], eval=[DataSource(eval_path, limit=4)])
    train, eval_, report = build_sft_datasets(data, tokenizer)
    assert sorted(train["where"]) == sorted(f"{train_path}:{i}" for i in range(1, 13))
    assert sorted(eval_["where"]) == [f"{eval_path}:{i}" for i in range(1, 5)]
    assert [(s.role, s.read) for s in report.sources] == [("train", 12), ("eval", 4)]


# --- sources -----------------------------------------------------------------------------------


def test_parquet_source(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(numbered(3)), path)
    train, _, _ = build_sft_datasets(section(str(path)), tokenizer)
    assert sorted(train["where"]) == [f"{path}#{i}" for i in range(3)]


def test_uncached_hub_dataset_gives_a_clear_error():
    with pytest.raises(
        DataError, match=r"no-such-org/no-such-set: cannot load hub dataset.*no hub is reachable"
    ):
        read_rows(DataSource("no-such-org/no-such-set"))


def test_hub_rows_carry_id_split_and_index(monkeypatch):
    import datasets

    def fake_load(path, name=None, split=None):
        assert (path, name, split) == ("org/chat", "en", "test")
        return datasets.Dataset.from_list(numbered(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows(DataSource("org/chat", subset="en", split="test", limit=2)).rows
    assert [r.where for r in rows] == ["org/chat:en[test]#0", "org/chat:en[test]#1"]


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_rows(DataSource(str(tmp_path / "absent.jsonl")))
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_rows(DataSource(str(csv)))
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match=r"one list field; found list fields \['a', 'b'\]"):
        read_rows(DataSource(str(two)))


# --- TRL: our labels are used as they are, and packing keeps examples apart ---------------------


def trl_prepare(dataset, tokenizer, packing: bool, max_length: int):
    """SFTTrainer's own dataset preparation, without building a model for a trainer.

    `_prepare_dataset` reads only these two attributes of the trainer when given tokenised data.
    """
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    args = SFTConfig(
        output_dir="unused", packing=packing, max_length=max_length, bf16=False, report_to="none"
    )
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=False)
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, packing, None, "train")


def test_trl_keeps_our_ids_and_labels(shared_data, tokenizer):
    path = str(shared_data / "raw/fastchat_dummy_conversation_sharegpt.json")
    train, _, _ = build_sft_datasets(section(DataSource(path, limit=50), max_length=256), tokenizer)
    prepared = trl_prepare(train, tokenizer, packing=False, max_length=256)
    assert prepared["input_ids"] == train["input_ids"]
    assert prepared["labels"] == train["labels"]


def test_packed_batches_keep_examples_apart(shared_data, tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    path = str(shared_data / "raw/fastchat_dummy_conversation_sharegpt.json")
    train, _, _ = build_sft_datasets(section(DataSource(path, limit=60), max_length=256), tokenizer)
    by_ids = {tuple(ex["input_ids"]): ex["labels"] for ex in train}
    packed = trl_prepare(train, tokenizer, packing=True, max_length=256)
    assert len(packed) < len(train)  # several examples share a packed row
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collate([packed[i] for i in range(4)])
    ids, labels, positions = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == sum(len(packed[i]["seq_lengths"]) for i in range(4)) > 4
    for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
        assert positions[start:end] == list(range(end - start))  # positions restart per example
        segment = tuple(ids[start:end])
        assert segment in by_ids  # each segment is one whole example of ours, nothing spliced in
        assert labels[start] == IGNORE  # nothing predicts an example's first token from the previous one
        assert labels[start:end] == by_ids[segment]  # our labels, untouched
