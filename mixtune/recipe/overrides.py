"""Command-line overrides, one syntax: `dotted.key=value`.

    accelerate launch -m mixtune.sft recipe.yaml training.learning_rate=1e-4 \\
        lora.targets=[q_proj,v_proj] data.train.0.path=other.jsonl

The value is read by the recipe's own YAML reader (so `1e-4` is a float, `no` a string, `[a,b]` a list)
and then checked and coerced like a value written in the file; a number in the key indexes a list
(one past the end appends). Overrides are applied to the parsed tree before validation, so an unknown
or misspelt key gets the same error, with a suggestion, as one in the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mixtune.recipe.loader import LocatedDict, LocatedList, parse_yaml_value
from mixtune.recipe.schema import RecipeError

SYNTAX = (
    "overrides are written dotted.key=value, e.g. training.learning_rate=1e-4, "
    "lora.targets=[q_proj,v_proj] or data.train.0.path=train.jsonl"
)
USAGE = f"usage: accelerate launch -m mixtune.<sft|dpo> RECIPE.yaml [dotted.key=value ...]; {SYNTAX}"
_KEY = re.compile(r"^[A-Za-z_]\w*(?:\.\w+)*$")


def split_override(text: str, source: str) -> tuple[str, str]:
    """Split `key=value` into its key and the raw value text; refuse anything else, showing the syntax."""
    key, sep, value = text.partition("=")
    if text.startswith("-"):
        raise RecipeError(f"{source}: override {text!r}: no dashes and no separate value; {SYNTAX}")
    if not sep or not _KEY.match(key.strip()):
        raise RecipeError(f"{source}: malformed override {text!r}: {SYNTAX}")
    return key.strip(), value


def split_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Split an entry point's arguments into the recipe path (first) and its overrides (the rest)."""
    if not argv or argv[0] in ("-h", "--help"):
        raise RecipeError(USAGE)
    path, overrides = argv[0], list(argv[1:])
    if "=" in path and not path.endswith((".yaml", ".yml")):
        raise RecipeError(f"the first argument must be the recipe file, got {path!r}; {USAGE}")
    for text in overrides:
        split_override(text, path)
    return path, overrides


def _new_container(next_part: str, label: str) -> LocatedDict | LocatedList:
    return LocatedList(label) if next_part.isdigit() else LocatedDict(label)


def apply_overrides(raw: LocatedDict, overrides: Sequence[str], source: str) -> LocatedDict:
    """Set each `dotted.key=value` in the parsed recipe tree `raw` (in place; also returned).

    Missing mappings on the way are created, so `data.eval.0.path=x.jsonl` works on a recipe without
    `data.eval`; whether the key is valid is decided afterwards, by the same checks as the file's keys.
    """
    for text in overrides:
        key, value_text = split_override(text, source)
        label = f"{source} (override {text!r})"
        value = parse_yaml_value(value_text, label)
        parts = key.split(".")
        node: LocatedDict | LocatedList = raw
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, LocatedList):
                if not part.isdigit() or int(part) > len(node):
                    raise RecipeError(
                        f"{label}: {here}: {'.'.join(parts[:depth])} is a list of {len(node)} item(s); "
                        f"index it with 0 to {len(node)} (the last one appends)"
                    )
                if int(part) == len(node):
                    node.append(None)
                    node.item_locs.append(label)
                part, locs = int(part), node.item_locs
            else:
                locs = node.key_locs
            if depth == len(parts) - 1:
                node[part], locs[part] = value, label
                break
            existing = node[part] if isinstance(node, list) else node.get(part)
            if existing is None:  # missing, or an empty section such as `lora:` with nothing under it
                node[part] = existing = _new_container(parts[depth + 1], label)
                locs[part] = label
            elif not isinstance(existing, dict | list):
                raise RecipeError(
                    f"{label}: {here} is {existing!r}, not a mapping or list, so {key} cannot be set"
                )
            node = existing
    return raw
