"""Writing a resolved recipe out, with secrets redacted.

A resolved recipe lands in output directories, W&B configs and bug reports, so anything that looks
like a credential becomes "***" on the way out: values under secret-looking keys (`hub_token`,
`wandb_api_key`, ...), strings in a known token format (`hf_...`, a 40-hex W&B key), and the current
values of secret environment variables (`HF_TOKEN`, `WANDB_API_KEY`) wherever they appear. The
`Recipe` itself keeps its values: the run may need the token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from mixtune.recipe.loader import YAML12_RESOLVERS
from mixtune.recipe.schema import TOP_LEVEL_KEYS, Recipe

REDACTED = "***"
# Tokenizer special tokens share the suffix but are not credentials.
_SPECIAL_TOKENS = {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"}
_SECRET_KEY = re.compile(
    r"(token|secret|password|passwd)$|secret|password|api_?key|access_?key|private_?key", re.I
)
_TOKEN_FORMATS = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{40,}|AKIA[0-9A-Z]{16})\b"
)
_WANDB_KEY = re.compile(r"[0-9a-f]{40}")
# 40 hex digits is also a git commit: leave those alone under keys that name one.
_COMMIT_KEY = re.compile(r"revision|commit|sha|hash", re.I)


def is_secret_key(key: Any) -> bool:
    """Whether a key's value should never be written out (`hub_token` yes, `pad_token`, `tokenizer` no)."""
    return isinstance(key, str) and key.lower() not in _SPECIAL_TOKENS and bool(_SECRET_KEY.search(key))


def _env_secrets() -> list[str]:
    """Values of secret-named environment variables (HF_TOKEN, WANDB_API_KEY, ...), longest first."""
    values = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8}  # short: flags, not keys
    return sorted(values, key=len, reverse=True)


def redact(value: Any, key: Any = None, _env: list[str] | None = None) -> Any:
    """A copy of `value` (nested dicts and lists of plain values) with secrets replaced by "***"."""
    env = _env_secrets() if _env is None else _env
    if value is None or isinstance(value, bool | int | float) or value == "":
        return value
    if is_secret_key(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, k, env) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key, env) for v in value]
    if isinstance(value, str):
        if _WANDB_KEY.fullmatch(value) and not (isinstance(key, str) and _COMMIT_KEY.search(key)):
            return REDACTED
        for secret in env:
            value = value.replace(secret, REDACTED)
        return _TOKEN_FORMATS.sub(REDACTED, value)
    return value


def _plain(value: Any) -> Any:
    """Config values -> YAML/JSON types: enums to their values, dataclasses to dicts, paths to str."""
    if isinstance(value, Enum):
        return _plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # e.g. a torch.dtype in model_init_kwargs; kept readable rather than dropped


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe (every section and every trainer field) as plain data, secrets redacted.

    Loading it back with `load_recipe` gives the same recipe, apart from redacted values.
    """
    sections = [key for key in TOP_LEVEL_KEYS if key != "stage"]
    return redact({"stage": recipe.stage, **{name: _plain(getattr(recipe, name)) for name in sections}})


def keep_hub_token_out_of_args(args: Any) -> None:
    """Take `hub_token` out of the trainer arguments, which the Trainer pickles into every checkpoint.

    `training_args.bin` is a pickle of the whole TrainingArguments, token included, written with
    every checkpoint and the final model and, with push_to_hub, uploaded with them. Redacting that
    one file would still leave the token in the live arguments that everything else reads, so the
    token leaves them: with push_to_hub it goes to the process environment as HF_TOKEN, where
    huggingface_hub finds it whenever no token is passed (and where `redact` finds it too); without
    push_to_hub nothing needs it, and it is dropped.
    """
    token = getattr(args, "hub_token", None)
    if not token:
        return
    if getattr(args, "push_to_hub", False):
        os.environ["HF_TOKEN"] = token
    args.hub_token = None


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either YAML 1.1 or 1.2 would read as something else ("no", "1e5")."""


for _tag, _rx, _first in YAML12_RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _rx, _first)


def save_resolved_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write `recipe_to_dict(recipe)` to `path` (YAML, or JSON for a .json suffix), atomically."""
    path = Path(path)
    data = recipe_to_dict(recipe)
    if path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        header = f"# mixtune resolved recipe (stage {recipe.stage}) from {recipe.source}; secrets redacted.\n"
        text = header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
    return path
