"""Weighted mixtures of sources and the train/eval split, on whole rows and before tokenisation.

Weights: a source with n usable rows and weight w gives round(w * n) training rows (halves round up).
w < 1 takes a seeded sample without replacement; w > 1 repeats every row floor(w) times and adds a
seeded sample for the fraction left (w = 2.5 on 10 rows: each row twice, 5 of them a third time).
Weights count structurally valid rows: rows later dropped for length leave the mixture short by that much.

Split: with `eval_fraction` f, a seeded f of the distinct rows the mixture chose (at least one) go to
eval, once each; every copy of them leaves train, so a repeated row can never sit on both sides.

Everything is seeded from `data.seed` and the source's position and path, with string seeds for
`random.Random` (stable across processes and PYTHONHASHSEED); adding a source does not resample others.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from mixtune.data.problems import DataError

# (source number, row number among that source's usable rows)
Key = tuple[int, int]


def weighted_rows(n_rows: int, weight: float, rng: random.Random) -> list[int]:
    """Row numbers (0 <= i < n_rows, repeats allowed) giving round(weight * n_rows) rows, sorted."""
    target = math.floor(weight * n_rows + 0.5)
    copies, extra = divmod(target, n_rows) if n_rows else (0, 0)
    rows = list(range(n_rows)) * copies + rng.sample(range(n_rows), extra)
    return sorted(rows)


def mix(
    paths: Sequence[str], sizes: Sequence[int], weights: Sequence[float], seed: int, role: str
) -> list[Key]:
    """The rows of a weighted mixture of sources, as keys, in a seeded shuffled order."""
    keys: list[Key] = []
    for number, (path, size, weight) in enumerate(zip(paths, sizes, weights, strict=True)):
        if not weight > 0:
            raise DataError(f"{path}: weight must be > 0, got {weight}")
        rows = weighted_rows(size, weight, random.Random(f"mixtune/mix/{seed}/{role}/{number}/{path}"))
        if size and not rows:
            raise DataError(f"{path}: weight {weight:g} on {size} rows rounds to 0 rows; raise the weight")
        keys += [(number, row) for row in rows]
    random.Random(f"mixtune/order/{seed}/{role}").shuffle(keys)
    return keys


def split_eval(keys: list[Key], eval_fraction: float, seed: int) -> tuple[list[Key], list[Key]]:
    """(train keys, eval keys): a seeded `eval_fraction` of the distinct keys, each once, go to eval."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return keys, []
    distinct = sorted(set(keys))
    random.Random(f"mixtune/eval_split/{seed}").shuffle(distinct)
    n_eval = max(1, math.floor(eval_fraction * len(distinct) + 0.5))
    if n_eval >= len(distinct):
        raise DataError(
            f"data.eval_fraction {eval_fraction:g} of {len(distinct)} distinct rows leaves no training rows"
        )
    held = set(distinct[:n_eval])
    return [k for k in keys if k not in held], sorted(held)
