"""Load whatever directory mixtune produced, ready to generate: `load_for_inference(path)`.

Two kinds of directory come out of mixtune:
- a full model (config.json + safetensors): an export, or a full fine-tuning output;
- a LoRA adapter (adapter_config.json): an SFT or DPO output with `lora.enabled`. Its base is the
  directory named by `base_model_name_or_path`, or, for a `preset:<name>` random init (which PEFT
  records as no base at all), the model that the run's saved recipe.yaml rebuilds (same preset,
  overrides and seed).

An adapter's base is always loaded in full precision, as mixtune.export merges it: a QLoRA run's
adapter then answers here exactly as its export will.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.tokenizer import load_tokenizer
from mixtune.train.model_loading import DTYPES, load_base_model, stage_model_section

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model.v1")


def load_for_inference(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for a mixtune model or adapter directory; the model is in eval mode.

    dtype: "float32", "bfloat16" or "float16". The tokenizer is the one saved in the directory
    (or in an adapter's base directory), else the bundled Mixtral v1 tokenizer.
    Raises FileNotFoundError or ValueError (mixtune's CheckpointError, RecipeError) naming the path.
    """
    directory = Path(path).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: not a directory (expected a mixtune model or adapter directory)"
        )
    if (directory / "adapter_config.json").is_file():
        from mixtune.lora import load_adapter  # PEFT (and bitsandbytes under it) take seconds to import

        base, base_dir = _adapter_base(directory, dtype, device)
        model = load_adapter(base, directory)
        tokenizer = _tokenizer(directory, base_dir)
    elif (directory / "config.json").is_file():
        # mixtune's loader refuses pickle-only weights itself, with a message that says why.
        model = MixtralForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], device=device)
        tokenizer = _tokenizer(directory)
    else:
        raise ValueError(
            f"{directory}: neither config.json (a full model) nor adapter_config.json (a LoRA adapter) "
            "is there; point at a training output_dir, one of its checkpoint-N folders, or an export"
        )
    return model.eval(), tokenizer


def base_config(model) -> MixtralConfig:
    """The Mixtral config of a plain or adapter-wrapped model."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _adapter_base(adapter_dir: Path, dtype: str, device: str) -> tuple[MixtralForCausalLM, Path | None]:
    """The adapter's base model, and its directory when it has one (a preset has none)."""
    config_file = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: not a readable adapter config ({err})") from err
    if not base or base.startswith("preset:"):
        # A random-init base is not recorded by PEFT at all (or only by its preset name), but the
        # run's recipe rebuilds it exactly.
        return _recipe_base(adapter_dir, base, dtype).to(device), None
    base_dir = Path(base).expanduser()
    if not base_dir.is_dir():
        raise FileNotFoundError(
            f"{adapter_dir}: its base model {base!r} (base_model_name_or_path in adapter_config.json) is not "
            f"a directory here (looked for {base_dir.absolute()}); edit that field to where the base now lives"
        )
    return MixtralForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype], device=device), base_dir


def _recipe_base(adapter_dir: Path, base: str | None, dtype: str) -> MixtralForCausalLM:
    """Rebuild the base from the recipe the run saved: a preset name alone lacks overrides and seed."""
    # Trainer checkpoints (output_dir/checkpoint-N) hold the adapter; the recipe is in output_dir.
    candidates = [adapter_dir / "recipe.yaml", adapter_dir.parent / "recipe.yaml"]
    recipe_file = next((c for c in candidates if c.is_file()), None)
    if recipe_file is None:
        raise FileNotFoundError(
            f"{adapter_dir}: the adapter's base is {repr(base) if base else 'not recorded'}, and without the run's "
            "recipe.yaml next to the adapter (or in its parent) that base cannot be rebuilt: a preset is a "
            "random init that only the recipe's config_overrides and init_seed reproduce"
        )
    section = stage_model_section(recipe_file.parent)
    if base and section.name_or_path != base:
        raise ValueError(
            f"{recipe_file}: model.name_or_path is {section.name_or_path!r} but the adapter's base is {base!r}"
        )
    return load_base_model(dataclasses.replace(section, dtype=dtype, load_in_4bit=False))


def _tokenizer(*directories: Path | None):
    for directory in directories:
        if directory is not None and any((directory / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(directory)
    return load_tokenizer()
