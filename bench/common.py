"""Shared benchmark plumbing: interleaved timing, medians, result files, tables.

These machines are shared and noisy, so every figure is a ratio of two things measured in the
same process, alternating A and B within each repetition, and the median of the per-repetition
ratios is reported (absolute times only come from a GPU, see B8).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# BENCHMARKS.md shapes: a "mini-Mixtral" layer with Mixtral's width ratio, and a small model.
BLOCK = dict(d=256, n=512, E=8, K=2, T=2048)
SMALL_MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
)
SMALL_BATCH = dict(batch=4, seq=256)
LORA_RANK = 16


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int = 7, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call for each function, run in turn within each repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of time[num] / time[den] (paired, so drifts in load cancel)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def environment() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }


def write_result(metric_id: str, result: dict) -> Path:
    """bench/results/<id>.json with the figures, their target and the environment."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{metric_id}.json"
    path.write_text(json.dumps({"id": metric_id, **result, "environment": environment()}, indent=2) + "\n")
    return path


def table(title: str, rows: list[tuple[str, str, str]]) -> str:
    """A small fixed-width table: (label, value, target)."""
    width = max(len(r[0]) for r in rows)
    lines = [title, f"  {'':<{width}}  {'value':>10}  target"]
    lines += [f"  {label:<{width}}  {value:>10}  {target}" for label, value, target in rows]
    return "\n".join(lines)
