"""The base model a recipe names: a local Mixtral directory or a random-init preset."""

from __future__ import annotations

from pathlib import Path

import torch

from mixtune.model import MixtralConfig, MixtralForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(model_section) -> MixtralForCausalLM:
    """Build or load the model (weights only; adapters and quantisation come after)."""
    dtype = DTYPES[model_section.dtype]
    if model_section.preset is not None:
        config = MixtralConfig.preset(model_section.preset, **model_section.config_overrides)
        # A preset is a random init: seeded, so the same recipe always starts from the same weights.
        with torch.random.fork_rng():
            torch.manual_seed(model_section.init_seed)
            model = MixtralForCausalLM(config)
        model.config.name_or_path = model_section.name_or_path
        return model.to(dtype)
    model = MixtralForCausalLM.from_pretrained(Path(model_section.name_or_path), dtype=dtype)
    model.config.name_or_path = str(model_section.name_or_path)
    return model


def tokenizer_source(model_section) -> str | None:
    """Where the tokenizer comes from: the recipe, else the model directory if it holds one, else the bundled v1."""
    if model_section.tokenizer:
        return model_section.tokenizer
    if model_section.preset is None:
        directory = Path(model_section.name_or_path)
        if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.model.v1").exists():
            return str(directory)
    return None
