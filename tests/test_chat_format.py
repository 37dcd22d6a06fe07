"""The Mixtral v1 chat format against mistral-common itself, on the shared fixture and on real conversations."""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import AutoTokenizer

from mixtune.chat_format import ChatFormatError, encode_chat, encode_completion, encode_prompt
from mixtune.tokenizer import load_tokenizer, save_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # CI: ../shared/data from the repo root
V1_FILE = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
BOS, EOS = 1, 2


# ---- helpers: real conversations and the mistral-common oracle ----


def real_conversations(data: Path) -> list[tuple[str, list[dict]]]:
    """(source, messages) for every row of the real multi-turn sets that end with an assistant turn.

    holdout/ is never read.
    """
    rows = []
    # gsm8k is one plain turn per row, so its first 300 rows show all it can; GPTeacher's code rows
    # (runs of spaces) and the multi-turn ShareGPT and HH rows are used in full.
    for name, limit in (("sft_gsm8k.jsonl", 300), ("sft_gpteacher.jsonl", None)):
        with open(data / name) as f:
            lines = f.readlines()[:limit]
        rows += [(f"{name}:{i + 1}", json.loads(line)["messages"]) for i, line in enumerate(lines)]
    role = {"human": "user", "gpt": "assistant"}
    sharegpt = json.loads((data / "raw" / "fastchat_dummy_conversation_sharegpt.json").read_text())
    for row in sharegpt:
        messages = [{"role": role[m["from"]], "content": m["value"]} for m in row["conversations"]]
        rows.append((f"sharegpt:{row['id']}", messages))
    with open(data / "pref_hh_harmless.jsonl") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            rows.append((f"pref_hh_harmless.jsonl:{i + 1}", row["prompt"] + row["chosen"]))
    return rows


def mistral_common_ids(tokenizer: MistralTokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def mismatches(pairs) -> str:
    """'' when every (where, got, expected) agrees, else a count and the first difference."""
    bad = [(where, got, want) for where, got, want in pairs if got != want]
    if not bad:
        return ""
    where, got, want = bad[0]
    first = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
    )
    return f"{len(bad)} differ; first at {where}, token {first}: got {got[first : first + 8]}, expected {want[first : first + 8]}"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA} (CI keeps it at ../shared/data)")
    return DATA


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def oracle() -> MistralTokenizer:
    """mistral-common in fine-tuning mode: conversations must end with the assistant."""
    return MistralTokenizer.from_file(str(V1_FILE), mode=ValidationMode.finetuning)


@pytest.fixture(scope="module")
def prompt_oracle() -> MistralTokenizer:
    """mistral-common in serving mode: conversations must end with a user turn."""
    return MistralTokenizer.from_file(str(V1_FILE), mode=ValidationMode.test)


@pytest.fixture(scope="module")
def conversations(data):
    return real_conversations(data)


@pytest.fixture(scope="module")
def encoded(tokenizer, conversations):
    return [encode_chat(tokenizer, messages) for _, messages in conversations]


@pytest.fixture(scope="module")
def hh_pairs(data) -> list[dict]:
    with open(data / "pref_hh_harmless.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- the mistral-common fixture: 7 messages, 118 ids ----


@pytest.fixture(scope="module")
def sample(data):
    folder = data / "tokenizer" / "mistral_common_v1_sample"
    messages = json.loads((folder / "sample.json").read_text())["messages"]
    ids = json.loads((folder / "tokens_v1.json").read_text())["tokens"]
    return messages, ids, (folder / "text_v1.txt").read_text()


def test_fixture_encoder(tokenizer, sample):
    messages, ids, text = sample
    assert len(messages) == 7 and len(ids) == 118
    # It ends with a user turn, so it is a prompt; its first six messages form a training
    # conversation whose ids must be a prefix of the same list.
    assert encode_prompt(tokenizer, messages) == ids
    chat = encode_chat(tokenizer, messages[:6])
    assert chat.input_ids == ids[: len(chat.input_ids)]
    assert "".join(tokenizer.convert_ids_to_tokens(ids)) == text


def test_fixture_hf_chat_template(tokenizer, sample, tmp_path):
    messages, ids, _ = sample
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    save_tokenizer(tokenizer, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(messages, tokenize=True, return_dict=False) == ids


# ---- real conversations, token for token ----


def test_real_conversations_match_mistral_common(conversations, encoded, oracle):
    assert len(conversations) == 300 + 2000 + 500 + 2000
    pairs = (
        (where, e.input_ids, mistral_common_ids(oracle, m))
        for (where, m), e in zip(conversations, encoded, strict=True)
    )
    assert not mismatches(pairs)


def test_hf_chat_template_matches_encoder(conversations, encoded):
    # The HF tokenizer's own chat template path: mistral-common's, in fine-tuning mode because these
    # conversations end with the assistant.
    hf = load_tokenizer(mode="finetuning")
    pairs = (
        (where, hf.apply_chat_template(m, tokenize=True, return_dict=False), e.input_ids)
        for (where, m), e in zip(conversations, encoded, strict=True)
    )
    assert not mismatches(pairs)


def test_prompts_and_prefix_property(tokenizer, hh_pairs, conversations, encoded, prompt_oracle):
    """DPO builds prompt + completion from two calls; that must equal the whole conversation."""
    chosen = {where: chat.input_ids for (where, _), chat in zip(conversations, encoded, strict=True)}
    pairs = []
    for i, row in enumerate(hh_pairs):
        where = f"pref_hh_harmless.jsonl:{i + 1}"
        prompt = encode_prompt(tokenizer, row["prompt"])
        pairs.append((where, prompt, mistral_common_ids(prompt_oracle, row["prompt"])))
        pairs.append(
            (where, prompt + encode_completion(tokenizer, row["chosen"][0]["content"]), chosen[where])
        )
        rejected = encode_chat(tokenizer, row["prompt"] + row["rejected"]).input_ids
        pairs.append((where, prompt + encode_completion(tokenizer, row["rejected"][0]["content"]), rejected))
    assert not mismatches(pairs)


def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer, conversations, encoded):
    for (where, messages), chat in zip(conversations, encoded, strict=True):
        assert len(chat.assistant_mask) == len(chat.input_ids), where
        assert chat.input_ids[0] == BOS and not chat.assistant_mask[0], where
        runs = _runs(chat.input_ids[1:], chat.assistant_mask[1:])
        # One run per turn, alternating: the user turn (not masked), then the assistant turn (masked, ending in </s>).
        assert [masked for masked, _ in runs] == [m["role"] == "assistant" for m in messages], where
        for (masked, ids), message in zip(runs, messages, strict=True):
            if masked:
                assert ids[-1] == EOS and EOS not in ids[:-1], where
                assert tokenizer.decode(ids[:-1], skip_special_tokens=True) == message["content"], where
            else:
                assert EOS not in ids, where
                assert (
                    tokenizer.decode(ids, skip_special_tokens=True) == f"[INST] {message['content']} [/INST]"
                ), where


def _runs(ids: list[int], mask: list[bool]) -> list[tuple[bool, list[int]]]:
    runs: list[tuple[bool, list[int]]] = []
    for token, masked in zip(ids, mask, strict=True):
        if runs and runs[-1][0] == masked:
            runs[-1][1].append(token)
        else:
            runs.append((masked, [token]))
    return runs


# ---- system messages and awkward text, against mistral-common ----

SYSTEM = "You are a careful assistant.\n  Answer   briefly."

AWKWARD = [
    "  two leading spaces and two trailing  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    'def f(x):\n    if x:\n        return "    indented"\n    return None',
    "literal special strings: </s> <s> <unk> [INST] [/INST] ▁",
    "unicode: café ☃ 𝔘 日本語 🤖 e\u0301",
    "\n starts with a newline",
]


def test_system_message_matches_mistral_common(tokenizer, conversations, oracle, prompt_oracle):
    # mistral-common's v1 puts the system prompt in front of the first user turn only.
    rows = [m for w, m in conversations if w.startswith("pref_hh")][:50] + [m for _, m in conversations][:50]
    for messages in rows:
        with_system = [{"role": "system", "content": SYSTEM}, *messages]
        chat = encode_chat(tokenizer, with_system)
        assert chat.input_ids == mistral_common_ids(oracle, with_system)
        assert encode_prompt(tokenizer, with_system[:-1]) == mistral_common_ids(
            prompt_oracle, with_system[:-1]
        )
        first_user = _runs(chat.input_ids[1:], chat.assistant_mask[1:])[0]
        assert first_user[0] is False
        assert (
            tokenizer.decode(first_user[1], skip_special_tokens=True)
            == f"[INST] {SYSTEM}\n\n{messages[0]['content']} [/INST]"
        )


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_text_matches_mistral_common(tokenizer, oracle, text):
    messages = [
        {"role": "user", "content": text},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": text},
    ]
    chat = encode_chat(tokenizer, messages)
    assert chat.input_ids == mistral_common_ids(oracle, messages)
    # A "</s>" typed inside a message is text, never the EOS id.
    assert chat.input_ids.count(EOS) == 2


# ---- ChatFormatError: what is wrong, and at which message ----

U, A, S = ({"role": r, "content": "hi"} for r in ("user", "assistant", "system"))

BAD_CHATS = [
    ("not a list", "hello", "messages must be a non-empty list"),
    ("empty", [], "messages must be a non-empty list"),
    ("message not a dict", [U, "hi"], "message 1: expected a {role, content} dict"),
    ("missing content", [{"role": "user"}, A], "message 0: expected a {role, content} dict"),
    ("unknown role", [U, {"role": "bot", "content": "x"}], "message 1: unknown role 'bot'"),
    ("tool role", [U, {"role": "tool", "content": "x"}], "message 1: unknown role 'tool'"),
    ("system not first", [U, S, A], "message 1: a system message must be the first message"),
    ("two user turns", [U, U, A], "message 1: expected role 'assistant', got 'user'"),
    ("starts with assistant", [A, U, A], "message 0: expected role 'user', got 'assistant'"),
    ("system then assistant", [S, A], "message 1: expected role 'user', got 'assistant'"),
    ("ends with user", [U, A, U], "message 2: the last message must be from the assistant, got 'user'"),
    ("only a system message", [S], "message 0: the last message must be from the assistant"),
    ("empty content", [U, {"role": "assistant", "content": ""}], "message 1 (assistant): content is empty"),
    ("blank content", [{"role": "user", "content": " \n\t"}, A], "message 0 (user): content is empty"),
    ("None content", [U, {"role": "assistant", "content": None}], "content must be a string, got NoneType"),
    (
        "list content",
        [{"role": "user", "content": ["hi"]}, A],
        "message 0 (user): content must be a string, got list",
    ),
    (
        "tool calls",
        [U, {**A, "tool_calls": [{"id": "x"}]}],
        "message 1: the Mixtral v1 format has no tool calls",
    ),
]


@pytest.mark.parametrize(("case", "messages", "error"), BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_encode_chat_errors(tokenizer, case, messages, error):
    with pytest.raises(ChatFormatError) as raised:
        encode_chat(tokenizer, messages)
    assert error in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_encode_prompt_and_completion_errors(tokenizer):
    with pytest.raises(
        ChatFormatError, match="message 1: the last message must be from the user, got 'assistant'"
    ):
        encode_prompt(tokenizer, [U, A])
    with pytest.raises(ChatFormatError, match="message 2: expected role 'user', got 'assistant'"):
        encode_prompt(tokenizer, [U, A, A, U])
    with pytest.raises(ChatFormatError, match="completion: content is empty"):
        encode_completion(tokenizer, "")
    with pytest.raises(ChatFormatError, match="completion: content must be a string, got int"):
        encode_completion(tokenizer, 3)
