"""mixtune.answer: multi-turn answers in FastChat's format, batched, resumable, with row errors located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtune import answer
from mixtune.chat import build_prompt_ids
from mixtune.generate import generate
from mixtune.tokenizer import load_tokenizer
from tests.test_chat_cli import assistant, one_thread, save_tiny_model, user  # noqa: F401 (a fixture)

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval_mt_bench.jsonl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-answer")
    save_tiny_model(directory)
    return directory


def test_mt_bench_answers_are_multi_turn_fastchat_rows_and_resume(tiny_dir, tmp_path, monkeypatch):
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} not found")
    prompts = []

    def recording_generate(model, batch, **kwargs):
        prompts.extend(batch)
        return generate(model, batch, **kwargs)

    monkeypatch.setattr(answer, "generate", recording_generate)
    out = tmp_path / "answers.jsonl"
    argv = [str(tiny_dir), "--questions", str(MT_BENCH), "--out", str(out), "--limit", "3"]
    assert answer.main([*argv, "--max-new-tokens", "4", "--batch-size", "2", "--model-id", "tiny"]) == 0

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [json.loads(line) for line in MT_BENCH.read_text().splitlines()[:3]]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    tokenizer = load_tokenizer(tiny_dir)
    for row, question in zip(rows, questions, strict=True):
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert row["model_id"] == "tiny" and len(row["answer_id"]) == 22
        (choice,) = row["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2
        # Turn 2 was asked after turn 1's question and the model's own turn-1 answer.
        first, second = question["turns"]
        history = [user(first), assistant(choice["turns"][0]), user(second)]
        assert build_prompt_ids(tokenizer, history) in prompts
    assert len(prompts) == 6  # 2 batches x 2 turns, every prompt asked once

    before = out.read_text()
    prompts.clear()
    assert answer.main(argv) == 0  # everything answered: nothing generated, nothing written
    assert out.read_text() == before and prompts == []


def test_batched_answers_equal_one_at_a_time(tiny_dir):
    from mixtune.inference import load_for_inference

    model, tokenizer = load_for_inference(tiny_dir)
    questions = [
        answer.Question(1, "", ["What is two plus two?", "And times three?"], "q:1"),
        answer.Question(2, "", ["Hi"], "q:2"),
    ]
    settings = dict(max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    together = answer.answer_batch(model, tokenizer, questions, **settings)
    alone = [answer.answer_batch(model, tokenizer, [q], **settings)[0] for q in questions]
    assert together == alone and [len(t) for t in together] == [2, 1]


def test_question_formats_and_bad_rows_name_file_and_line(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"question_id": 7, "category": "math", "turns": ["a", "b"]}\n\n'
        '{"prompt": "c"}\n{"instruction": "d", "input": "e", "id": "x"}\n'
    )
    parsed = answer.read_questions(good)
    assert [(q.question_id, q.turns) for q in parsed] == [(7, ["a", "b"]), (3, ["c"]), ("x", ["d\n\ne"])]

    for line in ('{"category": "x"}', '{"turns": ["ok", 3]}', '{"turns": []}', '{"prompt": ["a"]}', "[1]"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"turns": ["fine"]}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"{bad}:2: "):
            answer.read_questions(bad)
    assert answer.main(["unused", "--questions", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_a_half_written_last_row_is_dropped_on_resume(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"question_id": 1, "choices": []}\n{"question_id": 2, "cho')
    assert answer.answered_ids(out) == {1}
    assert out.read_text() == '{"question_id": 1, "choices": []}\n'
    out.write_text('garbage\n{"question_id": 1}\n')
    with pytest.raises(ValueError, match=f"{out}:1: "):
        answer.answered_ids(out)
