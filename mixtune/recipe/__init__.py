"""Recipes: a YAML file (plus `dotted.key=value` overrides) -> a validated, typed `Recipe`.

    from mixtune.recipe import load_recipe, recipe_from_argv
    recipe = load_recipe("recipes/tiny/sft/default.yaml", "sft", ["training.learning_rate=1e-4"])
    recipe.training  # trl.SFTConfig; recipe.model, .data, .lora, .router, .logging: see schema.py

Reading and checking live in loader.py, the override syntax in overrides.py, redaction and writing
out in secrets.py; this module only strings them together.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mixtune.recipe.loader import build_recipe, read_recipe_file
from mixtune.recipe.overrides import SYNTAX, apply_overrides, split_argv
from mixtune.recipe.schema import (
    LORA_TARGETS,
    DataSection,
    DataSource,
    LoggingSection,
    LoraSection,
    ModelSection,
    Recipe,
    RecipeError,
    RouterSection,
    Stage,
)
from mixtune.recipe.secrets import recipe_to_dict, redact, save_resolved_recipe


def load_recipe(path: str | Path, stage: Stage, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate the recipe at `path` for `stage`; raises `RecipeError`."""
    raw = read_recipe_file(path)
    apply_overrides(raw, overrides, str(path))
    return build_recipe(raw, stage, path)


def recipe_from_argv(stage: Stage, argv: Sequence[str] | None = None) -> Recipe:
    """For entry points: `RECIPE.yaml [key=value ...]` from `argv` (default sys.argv[1:]) -> Recipe.

    A bad recipe exits with status 2 and the one-line message, not a traceback.
    """
    try:
        path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
        return load_recipe(path, stage, overrides)
    except RecipeError as e:
        print(f"mixtune.{stage}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "LORA_TARGETS",
    "SYNTAX",
    "DataSection",
    "DataSource",
    "LoggingSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "RouterSection",
    "load_recipe",
    "recipe_from_argv",
    "recipe_to_dict",
    "redact",
    "save_resolved_recipe",
    "split_argv",
]
