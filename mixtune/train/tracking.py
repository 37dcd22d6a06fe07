"""Run tracking with W&B: a named run in a group with tags, offline when there is no account.

Offline runs write `<output_dir>/wandb/offline-run-*/`, which `wandb sync <dir>` uploads later and
`python -m mixtune.compare` reads locally. The recipe goes into the run's config with secrets
redacted (mixtune.recipe.secrets).
"""

from __future__ import annotations

import os
from pathlib import Path

from mixtune.recipe import recipe_to_dict


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def start_wandb(recipe, is_main_process: bool) -> str | None:
    """Start the W&B run the Trainer's WandbCallback will log into; returns its mode, or None when off."""
    if not recipe.logging.wandb:
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if _has_credentials() else "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_PROJECT", recipe.logging.project)
    if not is_main_process:
        return mode
    import wandb

    output_dir = Path(recipe.training.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wandb.init(
        project=recipe.logging.project,
        name=recipe.training.run_name or output_dir.name,
        group=recipe.logging.group or output_dir.parent.name or None,
        tags=sorted({*recipe.logging.tags, recipe.stage}),
        job_type=recipe.stage,
        dir=str(output_dir),
        mode=mode,
        config={"recipe": recipe_to_dict(recipe), "stage": recipe.stage},
    )
    return mode
