"""Resuming: which checkpoint, whether the recipe still fits it, and loading full weights exactly.

`training.resume_from_checkpoint` takes a checkpoint path, or `latest` (also `true`): the newest
checkpoint in output_dir that is complete and intact (mixtune.train.checkpoints). A named path
that is partial or damaged is an error naming the file; with `latest`, a damaged newer checkpoint
is passed over with a warning naming the file, and the run starts fresh only when output_dir holds
no checkpoint at all.

Every checkpoint holds the resolved recipe it was written with (`recipe.yaml`, secrets redacted).
On resume the two are compared key by key. Changes that make the checkpoint mean something else
(model, adapter shape and targets, router policy, training data and its order, batch geometry)
are refused unless listed in `reliability.allow_recipe_changes`; every other change (logging,
save and eval cadence, max_steps, learning rate, ...) is allowed with one warning that lists it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from mixtune.model.weights import CheckpointError, iter_parameters
from mixtune.recipe.schema import RecipeError
from mixtune.recipe.secrets import REDACTED, is_secret_key

from .checkpoints import newest_complete, verify

RECIPE_FILE = "recipe.yaml"
LATEST = ("latest", "true")

# Dotted recipe keys (or prefixes) whose change makes a resume meaningless.
MEANING_KEYS = (
    "stage",
    "model",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.targets",
    "lora.init_from",
    "router.policy",
    "data.train",
    "data.eval_fraction",
    "data.max_length",
    "data.packing",
    "data.overlong",
    "data.seed",
    "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps",
    "training.seed",
    "training.data_seed",
    "training.max_length",
    "training.packing",
    "training.train_sampling_strategy",
    "training.group_by_length",
)
# Keys that differ between any two launches and say nothing about the run.
NOISE_KEYS = ("training.resume_from_checkpoint", "training.logging_dir")

logger = logging.getLogger("mixtune.resume")


def resolve_checkpoint(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from (verified), or None to start fresh; raises CheckpointError."""
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in LATEST):
        found, passed_over = newest_complete(output_dir)
        for reason in passed_over:
            logger.warning("resume: passing over a checkpoint: %s", reason)
        if found is None and passed_over:  # each checkpoint it rejected has a reason here
            raise CheckpointError(
                f"{output_dir}: no complete, intact checkpoint to resume from:\n  " + "\n  ".join(passed_over)
            )
        if found is None:
            logger.warning("resume: no checkpoint in %s yet; starting from the beginning", output_dir)
        return found
    checkpoint = Path(resume)
    verify(checkpoint)
    return checkpoint


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _matches(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def recipe_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for each difference, secrets and noise left out."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b or _matches(key, NOISE_KEYS) or is_secret_key(key.rsplit(".", 1)[-1]) or REDACTED in (a, b):
            continue
        changes.append((key, a, b))
    return changes


def check_recipe(checkpoint: Path, current: dict, allowed: list[str], source: Any = None) -> None:
    """Warn about recipe changes since `checkpoint` was saved; RecipeError for meaningful ones."""
    path = checkpoint / RECIPE_FILE
    if not path.is_file():
        logger.warning("resume: %s has no %s; the recipe cannot be compared with it", checkpoint, RECIPE_FILE)
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    changes = recipe_changes(saved, current)
    refused = [c for c in changes if _matches(c[0], MEANING_KEYS) and not _matches(c[0], allowed)]
    listed = "\n  ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes)
    if refused:
        keys = ", ".join(key for key, _, _ in refused)
        raise RecipeError(
            f"{source}: cannot resume from {checkpoint}: the recipe changed since it was saved in ways that "
            f"change what the checkpoint means ({keys}).\n  {listed}\nRestore those values, or list the keys "
            "in reliability.allow_recipe_changes to resume anyway."
        )
    if changes:
        logger.warning("resume: the recipe changed since %s was saved:\n  %s", checkpoint, listed)


def load_full_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Copy a full-model checkpoint into `model` through mixtune's reader: every tensor, or an error.

    The Trainer's own loader reads `model.safetensors` with `load_state_dict(strict=False)`, which
    finds none of mixtune's stacked expert and router parameters under their classic-layout names
    and silently keeps the old values (the cause of resumed full fine-tuning drifting).
    """
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in iter_parameters(checkpoint, model.config):
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{checkpoint}: holds no values for {', '.join(missing[:8])}")
