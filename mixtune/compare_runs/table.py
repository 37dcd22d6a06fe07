"""What differs between runs, as text: recipe keys with different values, and final / best metrics."""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from .run import RunData

# Shown when present in any run. "best" is the minimum, except for the names in HIGHER_IS_BETTER.
DEFAULT_METRICS = (
    "train/loss",
    "eval/loss",
    "train/mean_token_accuracy",
    "eval/mean_token_accuracy",
    "train/rewards/accuracies",
    "train/rewards/margins",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "train/router/balance_loss",
    "train/router/z_loss",
    "train/router/max_over_mean",
    "train/router/drift_tv",
    "train/router/overflow_cf1_25",
    "train/router/collapsed_experts",
    "eval/router/balance_loss",
    "eval/router/max_over_mean",
)
HIGHER_IS_BETTER = ("accurac", "margin")
_MISSING = object()


def config_differences(runs: list[RunData]) -> dict[str, list[Any]]:
    """{key: [value per run]} for the recipe keys whose values are not all the same (missing counts)."""
    keys = sorted({key for run in runs for key in run.config})
    diff = {}
    for key in keys:
        values = [run.config.get(key, _MISSING) for run in runs]
        if any(v != values[0] for v in values[1:]):
            diff[key] = ["-" if v is _MISSING else v for v in values]
    return diff


def select_metrics(runs: list[RunData], patterns: list[str] | None) -> list[str]:
    """Metric names to report: the defaults that exist, or those matching the given names / globs.

    A pattern without a "train/" or "eval/" prefix also matches under "train/" (so `loss` works).
    """
    present = set().union(*(run.metric_names() for run in runs))
    if not patterns:
        return [m for m in DEFAULT_METRICS if m in present]
    chosen: list[str] = []
    for pattern in patterns:
        candidates = [pattern] if pattern.startswith(("train/", "eval/")) else [pattern, "train/" + pattern]
        for candidate in candidates:
            for name in sorted(fnmatch.filter(present, candidate)):
                if name not in chosen:
                    chosen.append(name)
    return chosen


def higher_is_better(metric: str) -> bool:
    return any(part in metric for part in HIGHER_IS_BETTER)


def final_and_best(run: RunData, metric: str) -> tuple[float, float] | None:
    """(last logged value, best logged value) of a metric in one run, or None when it never logged it."""
    values = [v for v in run.series(metric)[1] if math.isfinite(v)]
    if not values:
        return None
    return values[-1], (max(values) if higher_is_better(metric) else min(values))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def render(rows: list[list[str]], header: list[str]) -> str:
    """A left-aligned text table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def config_table(runs: list[RunData]) -> str:
    diff = config_differences(runs)
    if not diff:
        return "(the runs' recipes are identical)"
    return render(
        [[key, *map(_fmt, values)] for key, values in diff.items()], ["recipe key", *(r.label for r in runs)]
    )


def metrics_table(runs: list[RunData], metrics: list[str]) -> str:
    rows = []
    for metric in metrics:
        cells = []
        for run in runs:
            fb = final_and_best(run, metric)
            cells.append("-" if fb is None else f"{_fmt(fb[0])} ({_fmt(fb[1])})")
        rows.append([f"{metric} [{'max' if higher_is_better(metric) else 'min'}]", *cells])
    if not rows:
        return "(no matching metrics)"
    return render(rows, ["metric: final (best)", *(r.label for r in runs)])


def summary(runs: list[RunData], metrics: list[str]) -> dict[str, Any]:
    """The tables' content as JSON-ready data."""
    return {
        "runs": [
            {"label": r.label, "source": r.source, "reader": r.reader, "rows": len(r.history)} for r in runs
        ],
        "config_differences": config_differences(runs),
        "metrics": {
            metric: {
                run.label: (
                    None if (fb := final_and_best(run, metric)) is None else {"final": fb[0], "best": fb[1]}
                )
                for run in runs
            }
            for metric in metrics
        },
    }
