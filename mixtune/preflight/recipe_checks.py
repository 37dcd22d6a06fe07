"""Checks that need only the recipe and config files: validity, model shape and size, sliding window."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.recipe import Recipe, load_recipe
from mixtune.recipe.loader import read_recipe_file

from .report import Report


def choose_stage(path: str, given: str | None) -> tuple[str, str]:
    """(stage, where it came from): --stage, the recipe's own `stage:` key, the file name, or sft."""
    if given:
        return given, "--stage"
    try:
        raw = read_recipe_file(path)
    except Exception:  # the recipe check reports it properly
        raw = {}
    if raw.get("stage") in ("sft", "dpo"):
        return raw["stage"], "the recipe's stage key"
    if "dpo" in Path(path).stem or "dpo" in Path(path).parent.parts:
        return "dpo", "the file path"
    return "sft", "default; pass --stage dpo for a DPO recipe"


def check_recipe(report: Report, path: str, stage: str, overrides: Sequence[str]) -> Recipe | None:
    try:
        recipe = load_recipe(path, stage, overrides)
    except Exception as err:  # RecipeError, and anything a trainer config raises while it is built
        report.fail("recipe", str(err))
        return None
    report.passed(
        "recipe",
        f"{path} is a valid {stage} recipe" + (f" with {len(overrides)} override(s)" if overrides else ""),
    )
    return recipe


def recipe_model_config(section) -> MixtralConfig:
    """The config load_base_model will build from a model section: preset + overrides, or config.json."""
    if section.preset is not None:
        return MixtralConfig.preset(section.preset, **section.config_overrides)
    return MixtralConfig.from_pretrained(Path(section.name_or_path))


def parameter_count(config: MixtralConfig) -> int:
    """Total parameters, from a build on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def check_model_config(report: Report, recipe: Recipe) -> tuple[MixtralConfig, int] | None:
    try:
        config = recipe_model_config(recipe.model)
        params = parameter_count(config)
    except Exception as err:
        report.fail("model", f"{recipe.model.name_or_path}: no usable Mixtral config: {err}")
        return None
    report.passed(
        "model",
        f"{recipe.model.name_or_path}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, {human(params)} parameters, "
        f"{recipe.model.dtype}" + (", 4-bit" if recipe.model.load_in_4bit else ""),
    )
    return config, params


def check_sliding_window(report: Report, recipe: Recipe, config: MixtralConfig) -> None:
    """The window the model will train with, against the checkpoint's own recipe and max_length."""
    window, max_length = config.sliding_window, recipe.data.max_length
    where = "the preset" if recipe.model.preset is not None else "config.json"
    problems, notes = [], []
    made_by = None if recipe.model.preset is not None else Path(recipe.model.name_or_path) / "recipe.yaml"
    if made_by is not None and made_by.is_file():
        # A mixtune stage output: its config.json must say what the recipe that made it said.
        from mixtune.train.model_loading import stage_model_section

        try:
            made_with = recipe_model_config(stage_model_section(made_by.parent)).sliding_window
        except Exception as err:
            notes.append(f"could not read the checkpoint's own recipe ({err})")
        else:
            where += f", as in the recipe that made it ({made_by})"
            if made_with != window:
                problems.append(
                    f"config.json has sliding_window {window} but the recipe that made this checkpoint "
                    f"({made_by}) has {made_with}"
                )
    if window is not None and max_length > window:
        notes.append(
            f"data.max_length {max_length} > sliding_window {window}: tokens past the window cannot attend to "
            "the start of their sequence"
        )
    if max_length > config.max_position_embeddings:
        notes.append(
            f"data.max_length {max_length} > max_position_embeddings {config.max_position_embeddings}"
        )
    full = " (full attention)" if window is None else ""
    text = f"sliding_window {window}{full} in {where}; data.max_length {max_length}"
    if problems:
        report.fail("sliding window", "; ".join([*problems, *notes]))
    elif notes:
        report.warn("sliding window", text + "; " + "; ".join(notes))
    else:
        report.passed("sliding window", text)
