"""The base model a recipe names: a local Mixtral directory or a random-init preset."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mixtune.distributed import initialize_partitioned, partitioned_init, zero3_enabled
from mixtune.model import MixtralConfig, MixtralForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base_model(model_section) -> MixtralForCausalLM:
    """Build or load the model, quantised to 4-bit with `load_in_4bit` (adapters come after).

    Under DeepSpeed ZeRO-3 the model is built partitioned across ranks (mixtune.distributed), in
    DeepSpeed's dtype, with the same weights a one-process build gets.
    """
    dtype = DTYPES[model_section.dtype]
    zero3 = zero3_enabled()
    if zero3 and model_section.load_in_4bit:
        raise ValueError(
            "model.load_in_4bit does not run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned); "
            "launch QLoRA with configs/single_gpu.yaml or configs/multi_gpu.yaml"
        )
    if model_section.preset is not None:
        config = MixtralConfig.preset(model_section.preset, **model_section.config_overrides)
        # A preset is a random init: seeded, so the same recipe always starts from the same weights.
        with torch.random.fork_rng():
            torch.manual_seed(model_section.init_seed)
            if zero3:
                with partitioned_init():
                    model = MixtralForCausalLM(config)
                initialize_partitioned(model)
            else:
                model = MixtralForCausalLM(config)
        # Both names: PEFT records `name_or_path` as the adapter's base_model_name_or_path.
        model.config.name_or_path = model.name_or_path = model_section.name_or_path
        if not zero3:  # partitioned weights already have the dtype DeepSpeed trains in
            model = model.to(dtype)
    else:
        model = MixtralForCausalLM.from_pretrained(Path(model_section.name_or_path), dtype=dtype)
        model.config.name_or_path = model.name_or_path = str(model_section.name_or_path)
    if model_section.load_in_4bit:
        from mixtune.quant import quantize_model_4bit  # bitsandbytes is imported by 4-bit runs only

        model = quantize_model_4bit(model, dtype, device=_local_gpu())
    return model


def _local_gpu() -> torch.device | None:
    """This process's GPU, where quantising is fast and where training will run; None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def tokenizer_source(model_section) -> str | None:
    """Where the tokenizer comes from: the recipe, else the model directory if it holds one, else the bundled v1."""
    if model_section.tokenizer:
        return model_section.tokenizer
    if model_section.preset is None:
        directory = Path(model_section.name_or_path)
        if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.model.v1").exists():
            return str(directory)
    return None


def stage_model_section(stage_dir: str | Path):
    """The `model:` section of the resolved recipe a stage saved in its output directory.

    Only that section is read (and validated), so a stage output can be used from any working
    directory, even where the recipe's data paths do not resolve.
    """
    from mixtune.recipe.loader import _Where, build_dataclass, read_recipe_file
    from mixtune.recipe.schema import ModelSection

    path = Path(stage_dir) / "recipe.yaml"
    raw = read_recipe_file(path)
    return build_dataclass(ModelSection, raw.get("model"), "model", _Where(raw, str(path)))
