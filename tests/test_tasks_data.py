"""The embedded task dataset: shape, correctness, held-out hygiene and reproducibility.

Answers are recomputed here from the prompt text alone, by a checker that shares no code with
data/make_tasks.py, so a bug in the generator cannot vouch for itself.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from mixtune.tasks import TASK_FILES, TASKS_DIR, expected_answer, load_heldout, load_rows, macro_mean, score

SFT_SPLITS = ("sft_train", "sft_heldout")
PREF_SPLITS = ("pref_train", "pref_heldout")
SCRIPT = TASKS_DIR.parent / "make_tasks.py"


@cache
def rows(split: str) -> list[dict]:
    return load_rows(TASK_FILES[split])


def prompt_text(row: dict) -> str:
    return (row["prompt"] if "prompt" in row else row["messages"])[0]["content"]


# --- an independent checker: problem key and correct answer, from the prompt text alone --------


def numbers(prompt: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", prompt)]


def payload(prompt: str) -> str:
    """Word and letter prompts end with ': <word>' or ': <spaced letters>'."""
    return prompt.rsplit(": ", 1)[1]


def spaced_letters(prompt: str) -> str:
    text = payload(prompt)
    assert re.fullmatch(r"[a-z]( [a-z]){2,4}", text), prompt
    return text.replace(" ", "")


def solve(task: str, prompt: str) -> tuple[tuple, str]:
    """(problem key, correct answer). Commutative problems key on the unordered operands."""
    if task in ("add_two_digit", "larger"):
        a, b = numbers(prompt)
        assert task == "larger" or (10 <= a <= 99 and 10 <= b <= 99), prompt
        return (task, min(a, b), max(a, b)), str(a + b if task == "add_two_digit" else max(a, b))
    if task in ("add_one", "parity"):
        (n,) = numbers(prompt)
        return (task, n), str(n + 1) if task == "add_one" else ("odd" if n % 2 else "even")
    if task == "sort_digits":
        digits = numbers(prompt)
        assert len(digits) == 3 and all(d < 10 for d in digits), prompt
        return (task, *digits), " ".join(map(str, sorted(digits)))
    if task in ("reverse_letters", "upper_case", "repeat_letters"):
        s = spaced_letters(prompt)
        answer = {"reverse_letters": s[::-1], "upper_case": s.upper(), "repeat_letters": s}[task]
        return (task, s), " ".join(answer)
    raise AssertionError(f"unknown task {task!r}")


def near_miss(task: str, prompt: str, right: str, wrong: str) -> bool:
    """A rejected answer is a plausible slip of the right kind, not noise."""
    if task in ("add_two_digit", "add_one"):
        return wrong.isdigit() and abs(int(wrong) - int(right)) <= 10
    if task == "larger":
        return int(wrong) in numbers(prompt)
    if task == "parity":
        return wrong in ("even", "odd")
    if task in ("sort_digits", "reverse_letters"):
        return sorted(wrong.split()) == sorted(right.split())
    if task == "upper_case":
        return wrong.upper() == right
    return difflib.SequenceMatcher(a=right, b=wrong).ratio() >= 0.6  # repeat_letters


def keys(*splits: str) -> set[tuple]:
    return {solve(r["task"], prompt_text(r))[0] for split in splits for r in rows(split)}


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SFT_SPLITS)
def test_sft_rows_shape(split: str) -> None:
    assert rows(split)
    for row in rows(split):
        assert set(row) == {"messages", "task", "answer"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        assert row["messages"][-1]["content"] == row["answer"] == expected_answer(row)


@pytest.mark.parametrize("split", PREF_SPLITS)
def test_pref_rows_shape(split: str) -> None:
    assert rows(split)
    for row in rows(split):
        assert set(row) == {"prompt", "chosen", "rejected", "task"}
        turns = [*row["prompt"], *row["chosen"], *row["rejected"]]
        assert [m["role"] for m in turns] == ["user", "assistant", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in turns)


def test_every_task_in_every_file() -> None:
    tasks = {r["task"] for r in rows("sft_train")}
    assert len(tasks) >= 8
    for split in (*SFT_SPLITS, *PREF_SPLITS):
        counts = {t: sum(r["task"] == t for r in rows(split)) for t in tasks}
        assert min(counts.values()) >= 30, (split, counts)


def test_heldout_problems_never_trained_on() -> None:
    trained = keys("sft_train", "pref_train")
    for split in ("sft_heldout", "pref_heldout"):
        held = [solve(r["task"], prompt_text(r))[0] for r in rows(split)]
        assert len(held) == len(set(held)), f"{split} repeats a problem"
        assert not set(held) & trained, f"{split} shares problems with training"
    assert not keys("sft_heldout") & keys("pref_heldout")


@pytest.mark.parametrize("split", SFT_SPLITS)
def test_sft_answers_are_correct(split: str) -> None:
    for row in rows(split):
        assert row["answer"] == solve(row["task"], prompt_text(row))[1], row


@pytest.mark.parametrize("split", PREF_SPLITS)
def test_chosen_correct_rejected_a_wrong_near_miss(split: str) -> None:
    for row in rows(split):
        prompt, chosen, rejected = (
            prompt_text(row),
            row["chosen"][0]["content"],
            row["rejected"][0]["content"],
        )
        right = solve(row["task"], prompt)[1]
        assert chosen == right, row
        assert rejected != chosen, row
        assert near_miss(row["task"], prompt, right, rejected), row


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    # A different hash seed from `make`'s: output must not depend on set or dict-of-str ordering.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, env=env, capture_output=True
    )
    for split, path in TASK_FILES.items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == path.read_bytes(), (
            f"{path.name} is stale: run `python data/make_tasks.py`"
        )


def test_score_exact_match_per_task() -> None:
    held = load_heldout(TASK_FILES["pref_heldout"])
    right = score(held, [f" {expected_answer(r)}\n" for r in held])  # surrounding whitespace forgiven
    wrong = score(held, [r["rejected"][0]["content"] for r in held])
    assert set(right) == {r["task"] for r in held}
    assert macro_mean(right) == 1.0 and macro_mean(wrong) == 0.0
    first = held[0]["task"]
    half = score(held[:2] * 2, [expected_answer(held[0]), "?", "?", expected_answer(held[1])])
    assert half[first] == 0.5
    with pytest.raises(ValueError):
        score(held, [])
