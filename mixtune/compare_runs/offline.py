"""Runs on local disk, read with no network.

A path may be an `offline-run-*` (or `run-*`) directory holding a `.wandb` file, a `wandb/`
directory, or a training output directory with `wandb/offline-run-*` inside (the latest one is
read, as `wandb/latest-run` points to it).

The `.wandb` transaction log is read with `wandb leet inspect --json`: wandb 0.31 dropped its
Python datastore reader, and leet (its Go core) prints every record (run, config, history,
summary) as one JSON object per line. When that fails, or when a run logged without W&B, the
output directory's metrics.jsonl and recipe.yaml are read instead, and the reader says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .run import RunData, flatten, from_trainer_log, numeric_row

LEET_TIMEOUT_S = 120


class RunReadError(RuntimeError):
    """A path that holds no run compare can read; the message says what was looked for."""


def find_run_dir(path: Path) -> Path | None:
    """The W&B run directory (holding a .wandb file) at or under `path`, or None."""
    if any(path.glob("*.wandb")):
        return path
    wandb_dir = path / "wandb" if (path / "wandb").is_dir() else path
    latest = wandb_dir / "latest-run"
    if latest.is_dir() and any(latest.glob("*.wandb")):
        return latest.resolve()
    runs = sorted(p for p in wandb_dir.glob("*run-*") if p.is_dir() and any(p.glob("*.wandb")))
    return runs[-1] if runs else None


def leet_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's .wandb log, as parsed JSON."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=LEET_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RunReadError(f"{run_dir}: `wandb leet inspect` did not run: {err}") from err
    if done.returncode != 0:
        raise RunReadError(f"{run_dir}: `wandb leet inspect` failed: {done.stderr.strip()[-500:]}")
    records = []
    for line in done.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a run that is still writing
    if not any(r.get("type") == "run" for r in records):
        raise RunReadError(f"{run_dir}: `wandb leet inspect` printed no run record")
    return records


def from_records(records: list[dict[str, Any]], source: str) -> RunData:
    """RunData from leet's records: the run record's config (the redacted recipe) and history rows."""
    run = next(r["run"] for r in records if r.get("type") == "run")
    config = dict((run.get("config") or {}).get("update") or {})
    for record in records:
        if record.get("type") == "config":
            config.update(record["config"].get("update") or {})
    history = [numeric_row(r["history"].get("item") or {}) for r in records if r.get("type") == "history"]
    label = run.get("display_name") or run.get("run_id") or Path(source).name
    return RunData(label, source, "wandb leet inspect", recipe_config(config), history)


def recipe_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a run config compare diffs: the recipe mixtune stored (tracking.start_wandb)."""
    recipe = config.get("recipe")
    if isinstance(recipe, dict):
        return flatten(recipe)
    # A run not started by mixtune: its whole config, minus W&B's own keys.
    return flatten({k: v for k, v in config.items() if not k.startswith("_")})


def from_output_dir(output_dir: Path, why: str) -> RunData:
    """Last resort: the Trainer's metrics.jsonl and the resolved recipe.yaml of an output directory."""
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise RunReadError(f"{output_dir}: {why}, and there is no metrics.jsonl to fall back on")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    recipe_file = output_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    print(f"mixtune.compare: {output_dir}: {why}; reading metrics.jsonl instead", file=sys.stderr)
    return RunData(
        output_dir.name,
        str(output_dir),
        "metrics.jsonl",
        flatten(recipe),
        [from_trainer_log(r) for r in rows],
    )


def read_offline(path: str | Path) -> RunData:
    """Read one local run (see the module docstring); raises RunReadError."""
    path = Path(path)
    if not path.is_dir():
        raise RunReadError(f"{path}: not a directory")
    run_dir = find_run_dir(path)
    if run_dir is None:
        return from_output_dir(path, "no W&B run directory (wandb/offline-run-*) here")
    try:
        return from_records(leet_records(run_dir), str(run_dir))
    except RunReadError as err:
        # offline-run-X sits in <output_dir>/wandb/, next to metrics.jsonl's directory.
        output_dir = run_dir.parent.parent if run_dir.parent.name == "wandb" else path
        return from_output_dir(output_dir, str(err))
