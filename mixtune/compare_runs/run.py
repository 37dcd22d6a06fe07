"""One run as compare sees it: a label, the recipe it ran, and its logged rows under W&B's names.

W&B names are what the Trainer's WandbCallback logs: `train/loss`, `train/router/layer0/expert3_share`,
`eval/loss`, `eval/router/...`, `train/rewards/margins`, with `train/global_step` as the step.
metrics.jsonl rows (`loss`, `eval_loss`, `step`) are renamed to them by `from_trainer_log`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

STEP = "train/global_step"
_SHARE = re.compile(r"^train/router/layer(\d+)/expert(\d+)_share$")


@dataclass
class RunData:
    """label: a short name for tables and files; source: where it came from; reader: how it was read.

    config: the run's resolved recipe flattened to dotted keys ("training.learning_rate");
    history: one dict per logged row, numbers only, keyed by W&B metric names.
    """

    label: str
    source: str
    reader: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def metric_names(self) -> set[str]:
        return {key for row in self.history for key in row}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric, in logging order; rows without a step use their index."""
        steps, values = [], []
        for i, row in enumerate(self.history):
            if key in row:
                steps.append(row.get(STEP, float(i)))
                values.append(row[key])
        return steps, values

    def final_shares(self) -> list[list[float]] | None:
        """(L, E) per-expert shares from the last training row that has them, or None."""
        for row in reversed(self.history):
            cells = {(int(m[1]), int(m[2])): v for k, v in row.items() if (m := _SHARE.match(k))}
            if cells:
                layers = 1 + max(layer for layer, _ in cells)
                experts = 1 + max(expert for _, expert in cells)
                return [[cells.get((layer, e), math.nan) for e in range(experts)] for layer in range(layers)]
        return None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf}; an empty container stays as a leaf."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numeric_row(item: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of one logged row (W&B also logs strings, media and nested dicts)."""
    return {k: float(v) for k, v in item.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def from_trainer_log(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row renamed as W&B's Trainer callback would log it."""
    out = {}
    for key, value in numeric_row(row).items():
        if key == "step":
            out[STEP] = value
        elif key.startswith("eval_"):
            out["eval/" + key[len("eval_") :]] = value
        else:
            out["train/" + key] = value
    return out


def unique_labels(labels: list[str]) -> list[str]:
    """Labels made unique by numbering repeats (two runs both called "sft")."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out
