"""Generate mixtune's embedded task dataset: short instructions whose answers can be checked exactly.

    python data/make_tasks.py               # rewrites data/tasks/*.jsonl
    python data/make_tasks.py --out /tmp/x  # somewhere else (the test does this)

Eight tasks (two-digit addition, add one, repeat spaced letters, reverse spaced letters, sort three digits,
the larger of two numbers, parity, upper case), each with several phrasings. The split is made on
the underlying problem (the operands, the letters), never on the rendered text, so a
held-out problem is absent from every training file under every phrasing. Output is deterministic:
every random choice comes from a `random.Random` seeded with a string (hash-seed independent) and
nothing iterates over a set. Standard library only, so it runs before mixtune is installed.
See data/README.md for the choices behind tasks, phrasings and sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = "mixtune-tasks-v1"
OUT_DIR = Path(__file__).resolve().parent / "tasks"

# Rows per task. SFT: the demo sees ~900 steps x 64 rows, so 1,000 rows per task (8,000 in all) is
# about 7 epochs: enough variety that held-out accuracy measures the skill, small enough for git.
SFT_TRAIN_PER_TASK = 1000
PREF_TRAIN_PER_TASK = 375  # 3,000 pairs: ~90 s of DPO at 32 pairs per step sees each about once
SFT_HELDOUT_PER_TASK = 50  # 50 problems give accuracy to about +-0.07 per task
PREF_HELDOUT_PER_TASK = 30

LETTERS = 3  # letters per string in the letter tasks (see letter_strings)
LETTER_STRINGS = 3000  # random letter strings drawn for each letter task (17,576 possible)


@dataclass(frozen=True)
class Task:
    """One task: its phrasings and how to draw, render, answer and get wrong a problem.

    A problem is a hashable key (a tuple of ints or a str) that identifies it across phrasings;
    commutative problems are stored in sorted order and `fields` picks the order shown.
    """

    name: str
    templates: tuple[str, ...]
    problems: Callable[[random.Random], list]  # every problem, or a large sample, in a fixed order
    fields: Callable[[object, random.Random], dict[str, str]]  # values for the template
    answer: Callable[[object], str]
    near_misses: Callable[[object], list[str]]  # plausible wrong answers, in a fixed order


def spaced(letters: str) -> str:
    """'cat' -> 'c a t': one token per letter, which is what makes letter tasks learnable."""
    return " ".join(letters)


def swap_adjacent(items: str, i: int) -> str:
    """Swap items[i] and items[i + 1] (a one-slip mistake)."""
    return items[:i] + items[i + 1] + items[i] + items[i + 2 :]


def adjacent_swaps(items: str) -> list[str]:
    """Every string one adjacent swap away that actually differs from `items`."""
    return [swap_adjacent(items, i) for i in range(len(items) - 1) if items[i] != items[i + 1]]


def pair_fields(pair: tuple[int, int], rng: random.Random) -> dict[str, str]:
    """Show a commutative pair in either order; the problem key stays the sorted pair."""
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return {"a": str(a), "b": str(b)}


# --- arithmetic -------------------------------------------------------------------------------


def addition_near_misses(pair: tuple[int, int]) -> list[str]:
    """Off by one either way, or the carry mishandled (dropped, or added where there was none)."""
    a, b = pair
    total = a + b
    carried = a % 10 + b % 10 >= 10
    return [str(total - 1), str(total + 1), str(total - 10 if carried else total + 10)]


def add_one_near_misses(n: int) -> list[str]:
    """Forgot to add, added two, or (on a 9) reset the units without carrying into the tens."""
    misses = [str(n), str(n + 2)]
    if n % 10 == 9:
        misses.append(str(n - 9))
    return misses


ADD_TWO_DIGIT = Task(
    name="add_two_digit",
    templates=(
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Compute {a} plus {b}.",
        "What is the sum of {a} and {b}?",
        "{a} + {b} =",
    ),
    problems=lambda rng: [(a, b) for a in range(10, 100) for b in range(a, 100)],
    fields=pair_fields,
    answer=lambda p: str(p[0] + p[1]),
    near_misses=addition_near_misses,
)

# "one" is spelled out so that the prompt holds exactly one number (the checker relies on it).
ADD_ONE = Task(
    name="add_one",
    templates=(
        "What is {n} plus one?",
        "Add one to {n}.",
        "What number comes right after {n}?",
        "Increase {n} by one.",
        "Count up by one from {n}.",
    ),
    problems=lambda rng: list(range(999)),
    fields=lambda n, rng: {"n": str(n)},
    answer=lambda n: str(n + 1),
    near_misses=add_one_near_misses,
)

# --- comparison and parity ----------------------------------------------------------------------

LARGER = Task(
    name="larger",
    templates=(
        "Which is larger, {a} or {b}?",
        "Which number is bigger: {a} or {b}?",
        "What is the maximum of {a} and {b}?",
        "Pick the greater of {a} and {b}.",
        "Of {a} and {b}, which is more?",
    ),
    problems=lambda rng: [(a, b) for a in range(100) for b in range(a + 1, 100)],
    fields=pair_fields,
    answer=lambda p: str(max(p)),
    near_misses=lambda p: [str(min(p))],
)

PARITY = Task(
    name="parity",
    templates=(
        "Is {n} even or odd?",
        "Is the number {n} odd or even?",
        "Tell me whether {n} is even or odd.",
        "Even or odd: {n}?",
        "Say if {n} is odd or even.",
    ),
    problems=lambda rng: list(range(1000)),
    fields=lambda n, rng: {"n": str(n)},
    answer=lambda n: "odd" if n % 2 else "even",
    near_misses=lambda n: ["even" if n % 2 else "odd"],
)

# --- sequences ----------------------------------------------------------------------------------


def all_digit_triples(rng: random.Random) -> list[tuple[int, int, int]]:
    """Every ordered triple of digits except the ten with no wrong order (all three equal)."""
    triples = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    return [t for t in triples if len(set(t)) > 1]


def sort_near_misses(digits: tuple[int, int, int]) -> list[str]:
    """Descending order, the sorted answer with one slip, or the input handed back unsorted."""
    ascending = "".join(map(str, sorted(digits)))
    wrong = [ascending[::-1], *adjacent_swaps(ascending), "".join(map(str, digits))]
    return [spaced(w) for w in dict.fromkeys(wrong) if w != ascending]


SORT_DIGITS = Task(
    name="sort_digits",
    templates=(
        "Sort these digits from smallest to largest: {d}",
        "Put these digits in ascending order: {d}",
        "Arrange from lowest to highest: {d}",
        "Order these digits, smallest first: {d}",
        "Sort in increasing order: {d}",
    ),
    problems=all_digit_triples,
    fields=lambda t, rng: {"d": spaced("".join(map(str, t)))},
    answer=lambda t: spaced("".join(map(str, sorted(t)))),
    near_misses=sort_near_misses,
)


def letter_strings(rng: random.Random) -> list[str]:
    """A fixed sample of random lowercase strings of three letters, not all one letter.

    Three letters, always: with a fixed length the k-th answer letter sits at a fixed distance
    from the k-th prompt letter, which a from-scratch tiny model learns within the demo's minutes
    (held-out copy and upper case went from under 0.05 to 0.9 and above when lengths 3-5 became 3).
    """
    drawn: dict[str, None] = {}  # a dict, not a set: keeps draw order, so output is reproducible
    while len(drawn) < LETTER_STRINGS:
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(LETTERS))
        if len(set(s)) > 1:
            drawn[s] = None
    return list(drawn)


def reverse_near_misses(s: str) -> list[str]:
    """The reversal with two neighbours swapped, or the letters left in their original order."""
    right = s[::-1]
    return [spaced(w) for w in dict.fromkeys([*adjacent_swaps(right), s]) if w != right]


def upper_near_misses(s: str) -> list[str]:
    """Ignoring the format (lower case), or capitalising only the first or all but the last letter."""
    return [spaced(s), spaced(s[0].upper() + s[1:]), spaced(s[:-1].upper() + s[-1])]


REVERSE_LETTERS = Task(
    name="reverse_letters",
    templates=(
        "Reverse these letters: {s}",
        "Write the letters in reverse order: {s}",
        "Spell this backwards: {s}",
        "Read these letters from right to left: {s}",
        "Give the letters last to first: {s}",
    ),
    problems=letter_strings,
    fields=lambda s, rng: {"s": spaced(s)},
    answer=lambda s: spaced(s[::-1]),
    near_misses=reverse_near_misses,
)

UPPER_CASE = Task(
    name="upper_case",
    templates=(
        "Write these letters in upper case: {s}",
        "Capitalize every letter: {s}",
        "Convert to capital letters: {s}",
        "Rewrite in uppercase: {s}",
        "Answer in upper case, keeping the spaces: {s}",
    ),
    problems=letter_strings,
    fields=lambda s, rng: {"s": spaced(s)},
    answer=lambda s: spaced(s.upper()),
    near_misses=upper_near_misses,
)


def repeat_near_misses(s: str) -> list[str]:
    """Copy slips: two neighbouring letters swapped, the last letter dropped, or a letter doubled."""
    return [spaced(w) for w in dict.fromkeys([*adjacent_swaps(s), s[:-1], s + s[-1]]) if w != s]


# Copying spaced letters rather than whole words: a held-out word is a token the model never
# produced in training, and with untied embeddings a from-scratch model cannot emit a token whose
# output row never learned anything. 26 letters, all seen, in unseen combinations is a fair test.
REPEAT_LETTERS = Task(
    name="repeat_letters",
    templates=(
        "Repeat these letters: {s}",
        "Say the following letters back: {s}",
        "Copy the letters exactly: {s}",
        "Echo these letters: {s}",
        "Write these letters again: {s}",
    ),
    problems=letter_strings,
    fields=lambda s, rng: {"s": spaced(s)},
    answer=lambda s: spaced(s),
    near_misses=repeat_near_misses,
)

TASKS = (ADD_TWO_DIGIT, ADD_ONE, REPEAT_LETTERS, REVERSE_LETTERS, SORT_DIGITS, LARGER, PARITY, UPPER_CASE)

# --- rows and splits ----------------------------------------------------------------------------


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def render(task: Task, problem: object, template: str, rng: random.Random) -> str:
    return template.format(**task.fields(problem, rng))


def sft_row(task: Task, problem: object, template: str, rng: random.Random) -> dict:
    answer = task.answer(problem)
    prompt = render(task, problem, template, rng)
    return {"messages": [user(prompt), assistant(answer)], "task": task.name, "answer": answer}


def pref_row(task: Task, problem: object, template: str, rng: random.Random) -> dict:
    prompt = render(task, problem, template, rng)
    rejected = rng.choice(task.near_misses(problem))
    return {
        "prompt": [user(prompt)],
        "chosen": [assistant(task.answer(problem))],
        "rejected": [assistant(rejected)],
        "task": task.name,
    }


def sample_phrasings(task: Task, problems: list, n: int, rng: random.Random) -> list[tuple[object, str]]:
    """n distinct (problem, phrasing) pairs, so no row repeats even when problems are few."""
    k = len(task.templates)
    picks = rng.sample(range(len(problems) * k), n)
    return [(problems[i // k], task.templates[i % k]) for i in picks]


def one_phrasing_each(task: Task, problems: list, rng: random.Random) -> list[tuple[object, str]]:
    """Held-out: each problem once, in a random phrasing."""
    return [(p, rng.choice(task.templates)) for p in problems]


def task_rows(task: Task, seed: str) -> dict[str, list[dict]]:
    """All four splits for one task. Its own generator, so adding a task leaves the others as they are."""
    rng = random.Random(f"{seed}:{task.name}")
    problems = task.problems(rng)
    rng.shuffle(problems)
    # Held-out problems come off the front of one shuffle, so the three pools cannot overlap.
    cut_sft = SFT_HELDOUT_PER_TASK
    cut_pref = cut_sft + PREF_HELDOUT_PER_TASK
    sft_heldout, pref_heldout, train = problems[:cut_sft], problems[cut_sft:cut_pref], problems[cut_pref:]

    def rows(make_row: Callable, pairs: list[tuple[object, str]]) -> list[dict]:
        return [make_row(task, problem, template, rng) for problem, template in pairs]

    return {
        "sft_train": rows(sft_row, sample_phrasings(task, train, SFT_TRAIN_PER_TASK, rng)),
        "sft_heldout": rows(sft_row, one_phrasing_each(task, sft_heldout, rng)),
        "pref_train": rows(pref_row, sample_phrasings(task, train, PREF_TRAIN_PER_TASK, rng)),
        "pref_heldout": rows(pref_row, one_phrasing_each(task, pref_heldout, rng)),
    }


def build(seed: str = SEED) -> dict[str, list[dict]]:
    """Every split over all tasks. Training files are interleaved; held-out files stay grouped by task."""
    splits: dict[str, list[dict]] = {"sft_train": [], "sft_heldout": [], "pref_train": [], "pref_heldout": []}
    for task in TASKS:
        for split, rows in task_rows(task, seed).items():
            splits[split].extend(rows)
    shuffler = random.Random(f"{seed}:shuffle")
    shuffler.shuffle(splits["sft_train"])
    shuffler.shuffle(splits["pref_train"])
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # Explicit newline and encoding: the committed bytes must not depend on the platform. Compact
    # separators keep the four files under 2 MB.
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: data/tasks)")
    parser.add_argument("--seed", default=SEED, help="string seed; changing it changes every file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in build(args.seed).items():
        path = args.out / f"{split}.jsonl"
        write_jsonl(path, rows)
        print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
