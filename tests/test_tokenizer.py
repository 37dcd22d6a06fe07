"""The Mixtral v1 tokenizer: exact against SentencePiece, and unchanged through save_tokenizer and AutoTokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mistral_common
import pytest
import sentencepiece

from mixtune.chat_format import encode_chat, encode_prompt
from mixtune.tokenizer import load_tokenizer, save_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # CI: ../shared/data from the repo root
V1_FILE = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def real_chats(data: Path) -> dict[str, list[list[dict]]]:
    """Messages of the real sets, by set: SFT conversations, ShareGPT, and HH prompts with both replies.

    holdout/ is never read.
    """

    def jsonl(name: str, limit: int | None = None) -> list[dict]:
        with open(data / name) as f:
            return [json.loads(line) for line in f.readlines()[:limit]]

    role = {"human": "user", "gpt": "assistant"}
    sharegpt = json.loads((data / "raw" / "fastchat_dummy_conversation_sharegpt.json").read_text())
    hh = jsonl("pref_hh_harmless.jsonl")
    return {
        # gsm8k is one plain turn per row: its first 300 rows show all it can.
        "gsm8k": [row["messages"] for row in jsonl("sft_gsm8k.jsonl", 300)],
        "gpteacher": [row["messages"] for row in jsonl("sft_gpteacher.jsonl")],
        "sharegpt": [
            [{"role": role[m["from"]], "content": m["value"]} for m in r["conversations"]] for r in sharegpt
        ],
        "hh_prompts": [row["prompt"] for row in hh],
        "hh_replies": [row["chosen"] + row["rejected"] for row in hh],
    }


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA} (CI keeps it at ../shared/data)")
    return DATA


@pytest.fixture(scope="module")
def chats(data):
    return real_chats(data)


@pytest.fixture(scope="module")
def texts(chats) -> list[str]:
    return [m["content"] for rows in chats.values() for messages in rows for m in messages]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_v1():
    return sentencepiece.SentencePieceProcessor(model_file=str(V1_FILE))


def test_special_tokens_and_padding(tokenizer):
    assert tokenizer.vocab_size == len(tokenizer) == 32000
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (0, 1, 2, 0)
    assert tokenizer.pad_token == "<unk>"
    # Padding must never be EOS, or masking the padding would also mask every real </s>.
    padded = tokenizer.pad({"input_ids": [[1, 415, 2], [1]]})
    assert 2 not in padded["input_ids"][1] and padded["attention_mask"][1].count(0) == 2


def test_runs_of_spaces_split_like_sentencepiece(tokenizer):
    # The fast conversion gives ▁x ▁▁▁▁ " y here: SentencePiece scores whitespace-only pieces last.
    ids = tokenizer.encode('x    "y', add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁x", "▁▁▁", '▁"', "y"]
    assert tokenizer.encode('x    "y') == [tokenizer.bos_token_id, *ids]


def test_plain_text_matches_sentencepiece(tokenizer, sentencepiece_v1, texts):
    assert len(texts) > 15_000
    expected = sentencepiece_v1.encode(texts)
    bad = [
        t
        for t, ids in zip(texts, expected, strict=True)
        if tokenizer.encode(t, add_special_tokens=False) != ids
    ]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ from SentencePiece, e.g. {bad[0][:80]!r}"
    bad = [
        t
        for t, ids in zip(texts, expected, strict=True)
        if tokenizer.decode(ids, skip_special_tokens=True) != t
    ]
    assert not bad, f"{len(bad)} of {len(texts)} texts do not decode back, e.g. {bad[0][:80]!r}"


# Runs in a fresh interpreter, so nothing mixtune imported or registered can help the load.
FRESH_PROCESS = """
import json, sys
from transformers import AutoTokenizer
inputs = json.load(open(sys.argv[1]))
out = {}
for name, directory in inputs["dirs"].items():
    serving = AutoTokenizer.from_pretrained(directory)
    finetuning = AutoTokenizer.from_pretrained(directory, mode="finetuning")
    out[name] = {
        "class": type(serving).__name__,
        "special": [serving.bos_token_id, serving.eos_token_id, serving.pad_token_id],
        "texts": [serving.encode(t, add_special_tokens=False) for t in inputs["texts"]],
        "prompts": [serving.apply_chat_template(m, tokenize=True, return_dict=False) for m in inputs["prompts"]],
        "chats": [finetuning.apply_chat_template(m, tokenize=True, return_dict=False) for m in inputs["chats"]],
    }
json.dump(out, open(sys.argv[2], "w"))
"""


def test_saved_directory_in_a_fresh_process(tokenizer, sentencepiece_v1, chats, texts, data, tmp_path):
    """AutoTokenizer on what save_tokenizer wrote gives mixtune's and SentencePiece's ids.

    It is checked in a bare tokenizer directory and in a model directory, whose config.json
    changes the class AutoTokenizer picks.
    """
    dirs = {"tokenizer": tmp_path / "tokenizer", "model": tmp_path / "model"}
    for directory in dirs.values():
        save_tokenizer(tokenizer, directory)
    (dirs["model"] / "config.json").write_text(
        json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
    )

    sample = json.loads((data / "tokenizer" / "mistral_common_v1_sample" / "sample.json").read_text())[
        "messages"
    ]
    inputs = {
        "dirs": {name: str(d) for name, d in dirs.items()},
        "texts": [t for t in texts if "  " in t][:500],  # runs of spaces: where conversions go wrong
        "prompts": [sample, *chats["hh_prompts"][:100]],
        "chats": chats["gpteacher"][:100] + chats["sharegpt"][:100],
    }
    (tmp_path / "inputs.json").write_text(json.dumps(inputs))
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "inputs.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = {
        "class": "MistralCommonBackend",
        "special": [1, 2, 0],
        "texts": [sentencepiece_v1.encode(t) for t in inputs["texts"]],
        "prompts": [encode_prompt(tokenizer, m) for m in inputs["prompts"]],
        "chats": [encode_chat(tokenizer, m).input_ids for m in inputs["chats"]],
    }
    assert len(expected["texts"]) == 500 and len(expected["prompts"][0]) == 118
    out = json.loads((tmp_path / "out.json").read_text())
    for name in dirs:
        for key, want in expected.items():
            assert out[name][key] == want, f"{name} directory, {key}"


def test_load_tokenizer_from_directories(tokenizer, tmp_path):
    saved = tmp_path / "saved"
    save_tokenizer(tokenizer, saved)
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.model.v1", "tokenizer_config.json"]
    # A Trainer checkpoint holds only what the backend's own save_pretrained writes.
    bare = tmp_path / "bare"
    tokenizer.save_pretrained(bare)
    for directory in (saved, bare):
        loaded = load_tokenizer(directory)
        assert loaded.pad_token_id == 0 and loaded.encode("a  b") == tokenizer.encode("a  b")
    with pytest.raises(TypeError, match="save_tokenizer expects the tokenizer from load_tokenizer"):
        save_tokenizer(object(), tmp_path / "other")


def test_load_tokenizer_errors_name_the_directory(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for directory in (missing, empty):
        with pytest.raises(FileNotFoundError, match=str(directory)):
            load_tokenizer(directory)

    # Other tokenizers load, but would give other ids than v1: refused, not used.
    v3 = tmp_path / "v3"
    v3.mkdir()
    shutil.copy(V1_FILE.parent / "mistral_instruct_tokenizer_240323.model.v3", v3)
    (v3 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MistralCommonBackend"}))
    with pytest.raises(ValueError, match=rf"{v3} is MistralCommonBackend \(v3\)"):
        load_tokenizer(v3)

    spm = tmp_path / "sentencepiece_backend"
    spm.mkdir()
    shutil.copy(V1_FILE, spm / "tokenizer.model")
    config = {
        "tokenizer_class": "SentencePieceBackend",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (spm / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{spm} is SentencePieceBackend, not the exact Mixtral v1"):
        load_tokenizer(spm)
