"""Runs on a W&B server, through the public API (`wandb.Api`, which reads WANDB_API_KEY or ~/.netrc).

entity/project/run_id                  one run
entity/project  [--group G] [--tag T]  every run of the project in group G with any of the tags
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .offline import RunReadError, recipe_config
from .run import RunData, numeric_row

# entity/project or entity/project/run_id (W&B ids and names: letters, digits, - _ .)
ONLINE_PATH = re.compile(r"^[\w.-]+/[\w.-]+(/[\w.-]+)?$")


def is_online_path(text: str) -> bool:
    return bool(ONLINE_PATH.match(text))


def run_filters(group: str | None, tags: Sequence[str]) -> dict[str, Any]:
    """W&B's MongoDB-style run filter for a group and any of some tags."""
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$in": list(tags)}
    return filters


def from_api_run(run: Any) -> RunData:
    """RunData from a `wandb.apis.public.Run` (config is already unwrapped; history is scanned whole)."""
    history = [numeric_row(row) for row in run.scan_history()]
    return RunData(
        run.name or run.id, "/".join(run.path), "wandb api", recipe_config(dict(run.config)), history
    )


def read_online(
    path: str, group: str | None = None, tags: Sequence[str] = (), api: Any = None
) -> list[RunData]:
    """Runs named by `path` (see the module docstring); raises RunReadError when there are none."""
    if api is None:
        import wandb  # only online comparisons need the API client and its credentials

        api = wandb.Api()
    if path.count("/") == 2:
        if group or tags:
            raise RunReadError(f"{path}: --group/--tag filter a project (entity/project), not one run")
        return [from_api_run(api.run(path))]
    runs = list(api.runs(path, filters=run_filters(group, tags)))
    if not runs:
        raise RunReadError(f"{path}: no runs match (group {group!r}, tags {list(tags)})")
    return [from_api_run(run) for run in runs]
