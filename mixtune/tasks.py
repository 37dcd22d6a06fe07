"""The embedded task dataset (data/tasks/, made by data/make_tasks.py): where it lives, how to score it.

Rows come in two shapes, both JSONL with a "task" field:
- SFT: {"messages": [user, assistant], "task", "answer"}
- preference: {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task"}

Every task has one exactly-checkable answer, so scoring is exact match after stripping whitespace.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

# Resolved from this file rather than the working directory, so the recipes, the tests and
# `make demo` find the data from wherever they run (this assumes an editable install, as `make` does).
TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
TASK_FILES: dict[str, Path] = {
    "sft_train": TASKS_DIR / "sft_train.jsonl",
    "sft_heldout": TASKS_DIR / "sft_heldout.jsonl",
    "pref_train": TASKS_DIR / "pref_train.jsonl",
    "pref_heldout": TASKS_DIR / "pref_heldout.jsonl",
}


def load_rows(path: str | Path) -> list[dict]:
    """Read a JSONL file of task rows (either shape), skipping blank lines."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_heldout(path: str | Path = TASK_FILES["sft_heldout"]) -> list[dict]:
    """Held-out rows to evaluate on; fails early, naming the line, on a row that cannot be scored."""
    rows = load_rows(path)
    for i, row in enumerate(rows, start=1):
        if "task" not in row or not ("messages" in row or "prompt" in row):
            raise ValueError(f"{path}: row {i} has no 'task' or no 'messages'/'prompt'")
    return rows


def expected_answer(row: dict) -> str:
    """The correct assistant text: `answer` of an SFT row, or the content of a preference row's `chosen`."""
    if "answer" in row:
        return row["answer"]
    if "chosen" in row:
        return row["chosen"][-1]["content"]
    return row["messages"][-1]["content"]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation to generate from: everything before the answer."""
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


def is_correct(prediction: str, expected: str) -> bool:
    """Exact match; only surrounding whitespace (a leading space, a trailing newline) is forgiven."""
    return prediction.strip() == expected.strip()


def score(task_rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per task, {task: fraction correct}, tasks in name order.

    task_rows and predictions are parallel: predictions[i] is the model's text for task_rows[i].
    """
    if len(task_rows) != len(predictions):
        raise ValueError(f"{len(task_rows)} rows but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, prediction in zip(task_rows, predictions, strict=True):
        hits[row["task"]].append(is_correct(prediction, expected_answer(row)))
    return {task: sum(h) / len(h) for task, h in sorted(hits.items())}


def macro_mean(scores: dict[str, float]) -> float:
    """Mean over tasks, each task weighing the same whatever its row count (0.0 for no tasks)."""
    return sum(scores.values()) / len(scores) if scores else 0.0
