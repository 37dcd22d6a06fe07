"""The preference (DPO) data pipeline: formats, HH transcripts, bad pairs, lengths and TRL's collator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixtune.chat_format import encode_chat
from mixtune.data import DataError, build_preference_datasets, read_rows, split_hh_transcript
from mixtune.recipe.schema import DataSection, DataSource
from mixtune.tasks import TASK_FILES

HH_RAW = "raw/hh_rlhf_harmless_base_test_first300.jsonl"
PROMPT = [{"role": "user", "content": "Name a colour."}]
GOOD = {
    "prompt": PROMPT,
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "Seven."}],
}


@pytest.fixture(scope="module")
def tokenizer():
    from mixtune.tokenizer import load_tokenizer

    return load_tokenizer()


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return str(path)


def section(*paths: str, **kwargs) -> DataSection:
    return DataSection(train=[p if isinstance(p, DataSource) else DataSource(p) for p in paths], **kwargs)


def pairs(path: str, **source) -> list:
    return read_rows(DataSource(path, **source), stage="dpo").rows


# --- the real files --------------------------------------------------------------------------


def test_processed_hh_file(shared_data, tokenizer):
    path = str(shared_data / "pref_hh_harmless.jsonl")
    train, eval_, report = build_preference_datasets(section(path, max_length=1024), tokenizer)
    assert (len(train), eval_) == (2000, None)
    assert train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "where"]
    assert (report.sources[0].format, report.sources[0].kept, report.truncated) == ("preference", 2000, 0)
    # prompt + reply is exactly the chat encoding of the whole conversation (prompt ids are a prefix)
    rows = {p.where: p for p in pairs(path, limit=50)}
    for example in train.filter(lambda e: e["where"] in rows):
        pair = rows[example["where"]]
        whole = encode_chat(
            tokenizer, [*pair.prompt, {"role": "assistant", "content": pair.chosen}]
        ).input_ids
        assert example["prompt_ids"] + example["chosen_ids"] == whole
        assert example["chosen_ids"][-1] == example["rejected_ids"][-1] == tokenizer.eos_token_id
        assert example["prompt_ids"].count(tokenizer.bos_token_id) == 1


def test_raw_hh_transcripts(shared_data, tokenizer):
    path = str(shared_data / HH_RAW)
    data = section(path, on_bad_row="skip", max_skip_fraction=0.01)
    train, _, report = build_preference_datasets(data, tokenizer)
    (source,) = report.sources
    assert (source.format, source.read, source.kept, source.skipped) == (
        "hh",
        300,
        299,
        {"empty_response": 1},
    )
    assert source.examples == [f"{path}:87: chosen is empty"]  # its chosen transcript ends "Assistant: "
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:87: chosen is empty \[empty_response\]"):
        build_preference_datasets(section(path), tokenizer)


def test_hh_parser_reproduces_the_processed_prompts(shared_data):
    """Rows of the raw file that the processed file kept must come out with the same prompt and replies."""
    processed = {(p.chosen, p.rejected): p.prompt for p in pairs(str(shared_data / "pref_hh_harmless.jsonl"))}
    raw = read_rows(DataSource(str(shared_data / HH_RAW)), stage="dpo", on_bad_row="skip").rows
    both = [p for p in raw if (p.chosen, p.rejected) in processed]
    assert len(both) >= 250  # 2000 of the 2299 usable pairs went to the processed file
    assert all(p.prompt == processed[p.chosen, p.rejected] for p in both)
    assert max(len(p.prompt) for p in both) > 5  # multi-turn prompts are among them


def test_embedded_task_pairs(tokenizer):
    train, _, report = build_preference_datasets(
        section(str(TASK_FILES["pref_train"]), max_length=64), tokenizer
    )
    assert len(train) == 3000 and report.sources[0].n_skipped == 0


def test_sft_file_is_refused_for_dpo(shared_data):
    with pytest.raises(DataError, match="format 'messages'.*cannot be used for DPO"):
        read_rows(DataSource(str(shared_data / "sft_gsm8k.jsonl"), limit=3), stage="dpo")


# --- formats -----------------------------------------------------------------------------------


def test_string_and_list_shapes_agree(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            GOOD,
            {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
            {**GOOD, "chosen": "Blue."},
        ],
    )
    rows = pairs(path)
    assert {(json.dumps(r.prompt), r.chosen, r.rejected) for r in rows} == {
        (json.dumps(PROMPT), "Blue.", "Seven.")
    }
    assert rows[0].to_dict() == GOOD


def test_implicit_prompt_is_split_off(tmp_path):
    turns = [*PROMPT, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "Blue."}],
        "rejected": [*turns, {"role": "assistant", "content": "No."}],
    }
    (pair,) = pairs(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert (pair.prompt, pair.chosen, pair.rejected) == (turns, "Blue.", "No.")


def test_hh_split_strips_turns_and_keeps_inline_markers():
    text = "\n\nHuman: hi there \n\nAssistant: Human: is not a turn here\n\nHuman: ok\n\nAssistant:"
    assert split_hh_transcript(text) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Human: is not a turn here"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": ""},
    ]


# --- bad pairs -----------------------------------------------------------------------------------

ASSISTANT = [{"role": "assistant", "content": "Blue."}]
BAD_PAIRS = {
    "missing prompt": ({"chosen": "Blue.", "rejected": "Seven."}, "missing_field"),
    "missing chosen": ({"prompt": PROMPT, "rejected": ASSISTANT}, "missing_field"),
    "missing rejected": ({"prompt": PROMPT, "chosen": ASSISTANT}, "missing_field"),
    "identical": ({**GOOD, "rejected": ASSISTANT}, "identical_responses"),
    "empty chosen": ({**GOOD, "chosen": [{"role": "assistant", "content": " "}]}, "empty_response"),
    "empty rejected": ({**GOOD, "rejected": ""}, "empty_response"),
    "prompt ends with assistant": ({**GOOD, "prompt": [*PROMPT, *ASSISTANT]}, "prompt_last_not_user"),
    "two-message reply": ({**GOOD, "chosen": [*ASSISTANT, *PROMPT]}, "bad_completion"),
    "unknown role in prompt": ({**GOOD, "prompt": [{"role": "bot", "content": "x"}]}, "unknown_role"),
    "diverge before the last turn": (
        {
            "chosen": [*PROMPT, *ASSISTANT, *PROMPT, *ASSISTANT],
            "rejected": [*PROMPT, {"role": "assistant", "content": "Red."}, *PROMPT, *ASSISTANT],
        },
        "diverge_early",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pair_stops_or_is_counted(tmp_path, tokenizer, case):
    row, reason = BAD_PAIRS[case]
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: .*\[{reason}\]"):
        build_preference_datasets(section(path), tokenizer)
    data = section(path, on_bad_row="skip", max_skip_fraction=0.5)
    train, _, report = build_preference_datasets(data, tokenizer)
    assert (len(train), report.sources[0].skipped) == (2, {reason: 1})


HH = "\n\nHuman: {}\n\nAssistant: {}\n\nHuman: {}\n\nAssistant: {}"
BAD_HH = {
    "diverge_early": {"chosen": HH.format("a", "b", "c", "d"), "rejected": HH.format("a", "X", "c", "e")},
    "identical_responses": {
        "chosen": HH.format("a", "b", "c", "d"),
        "rejected": HH.format("a", "b", "c", "d "),
    },
    "roles_not_alternating": {
        "chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c",
        "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d",
    },
    "bad_transcript": {
        "chosen": "preamble" + HH.format("a", "b", "c", "d"),
        "rejected": HH.format("a", "b", "c", "e"),
    },
}


@pytest.mark.parametrize("reason", sorted(BAD_HH))
def test_bad_hh_transcripts(tmp_path, reason):
    good = {"chosen": HH.format("a", "b", "c", "d"), "rejected": HH.format("a", "b", "c", "e")}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, BAD_HH[reason]])
    rows = read_rows(DataSource(path), stage="dpo", on_bad_row="skip")
    assert rows.report.format == "hh"
    assert (len(rows.rows), rows.report.skipped) == (1, {reason: 1})


# --- lengths -------------------------------------------------------------------------------------


def length_rows(tmp_path: Path) -> str:
    """Line 1 fits 24 tokens; line 2 has long replies that differ early; line 3 long replies that
    differ only at the end; line 4 a prompt longer than 24 tokens."""
    words = " ".join(["word"] * 40)
    return write_jsonl(
        tmp_path / "long.jsonl",
        [
            GOOD,
            {"prompt": "Hi", "chosen": "Yes " + words, "rejected": "No " + words},
            {"prompt": "Hi", "chosen": words + " yes", "rejected": words + " no"},
            {"prompt": words, "chosen": "Yes", "rejected": "No"},
        ],
    )


def test_overlong_pairs_truncate_the_replies_only(tmp_path, tokenizer):
    data = section(length_rows(tmp_path), max_length=24, on_bad_row="skip", max_skip_fraction=0.5)
    train, _, report = build_preference_datasets(data, tokenizer)
    (source,) = report.sources
    assert source.skipped == {"identical_after_truncation": 1, "prompt_too_long": 1}
    assert (source.kept, source.truncated) == (2, 1)
    for example in train:
        assert (
            len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= 24
        )
    long = train.filter(lambda e: e["where"].endswith(":2"))[0]
    assert len(long["prompt_ids"]) + len(long["chosen_ids"]) == 24


def test_overlong_policies_for_pairs(tmp_path, tokenizer):
    path = length_rows(tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: .*\[identical_after_truncation\]"):
        build_preference_datasets(section(path, max_length=24), tokenizer)
    _, _, report = build_preference_datasets(section(path, max_length=24, overlong="drop"), tokenizer)
    assert (report.sources[0].kept, report.dropped_overlong, report.sources[0].n_skipped) == (1, 3, 0)
    with pytest.raises(
        DataError, match=rf"^{re.escape(path)}:2: pair is \d+ tokens .*over data.max_length 24"
    ):
        build_preference_datasets(section(path, max_length=24, overlong="error"), tokenizer)
    short = write_jsonl(
        tmp_path / "short.jsonl", [GOOD, {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(DataError, match=rf"^{re.escape(short)}:2: prompt is \d+ tokens.*\[prompt_too_long\]"):
        build_preference_datasets(section(short, max_length=24), tokenizer)


def test_eval_fraction_for_pairs(shared_data, tokenizer):
    path = str(shared_data / "pref_hh_harmless.jsonl")
    data = section(DataSource(path, limit=100), eval_fraction=0.1, max_length=1024)
    train, eval_, _ = build_preference_datasets(data, tokenizer)
    assert (len(train), len(eval_)) == (90, 10)
    assert not set(train["where"]) & set(eval_["where"])


# --- TRL's collator takes our columns as they are --------------------------------------------------


def test_trl_preference_collator_uses_our_ids(shared_data, tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    path = str(shared_data / "pref_hh_harmless.jsonl")
    # 256 tokens: some replies are cut here, and the collator, given the same max_length, must cut nothing more
    data = section(DataSource(path, limit=40), max_length=256, on_bad_row="skip", max_skip_fraction=1.0)
    train, _, report = build_preference_datasets(data, tokenizer)
    assert report.truncated > 0
    examples = list(train)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=data.max_length)(
        examples
    )
    sides = [(e["prompt_ids"], e["chosen_ids"]) for e in examples] + [
        (e["prompt_ids"], e["rejected_ids"]) for e in examples
    ]
    for row, (prompt, reply) in enumerate(sides):
        n = len(prompt) + len(reply)
        assert batch["input_ids"][row, :n].tolist() == prompt + reply  # nothing cut: rows already fit
        assert batch["completion_mask"][row, :n].tolist() == [0] * len(prompt) + [1] * len(reply)
        assert batch["attention_mask"][row].sum().item() == n


def test_trl_dpo_preparation_cannot_take_tokenised_pairs(tokenizer):
    """Why the DPO entry point must skip DPOTrainer._prepare_dataset for our datasets: in TRL 1.16 it
    always extracts a prompt from `chosen`/`rejected` text and re-tokenises. If this starts passing
    tokenised pairs through, the skip can go."""
    import types

    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    train, _, _ = build_preference_datasets(
        section(DataSource(str(TASK_FILES["pref_train"]), limit=4)), tokenizer
    )
    args = DPOConfig(output_dir="unused", bf16=False, report_to="none", max_length=64)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    with pytest.raises(KeyError, match="chosen"):
        DPOTrainer._prepare_dataset(trainer, train, tokenizer, args, "train")
