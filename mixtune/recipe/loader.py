"""Recipe YAML -> `Recipe`: safe YAML 1.2 reading with line numbers, coercion by field type, validation.

Three steps, in file order:
1. `read_recipe_file` / `parse_yaml_value`: a SafeLoader subclass whose implicit types follow YAML 1.2
   core (only true/false are booleans, `1e-5` is a float, `no` is a string), which refuses `!!python`
   tags and duplicate keys, and records where each key came from ("recipe.yaml:12").
2. `coerce`: a value against a type hint (Union, Optional, Literal, Enum, list, dict, dataclass),
   used alike for mixtune's sections and for every field of TRL's SFTConfig / DPOConfig.
3. `build_recipe`: sections, trainer config, mixtune's defaults and the cross-field checks.
Every failure is a `RecipeError` whose message starts with the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import re
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mixtune.recipe.schema import (
    LOCAL_DATA_SUFFIXES,
    LORA_TARGETS,
    SECTIONS,
    TOP_LEVEL_KEYS,
    Recipe,
    RecipeError,
    Stage,
)

# --- 1. YAML ---------------------------------------------------------------------------------------

# YAML 1.2 core schema scalars: (tag, regexp, possible first characters). Ints before floats, since
# the float pattern also matches "16".
YAML12_RESOLVERS = (
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
        list("-+0123456789"),
    ),
    (
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+.0123456789"),
    ),
)
# YAML 1.1 rules PyYAML applies that turn `no`, `on`, `1_000`, `2024-01-01` or `=` into non-strings.
_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp", "value", "yaml")}


class LocatedDict(dict):
    """A YAML mapping that remembers where it and each of its keys were written."""

    def __init__(self, loc: str) -> None:
        super().__init__()
        self.loc = loc
        self.key_locs: dict[Any, str] = {}


class LocatedList(list):
    """A YAML sequence that remembers where each item was written."""

    def __init__(self, loc: str) -> None:
        super().__init__()
        self.loc = loc
        self.item_locs: list[str] = []


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in rules if tag not in _YAML11_TAGS]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, text: str, where: Callable[[int], str]) -> None:
        super().__init__(text)
        self.where = where

    def _at(self, node: yaml.Node) -> str:
        return self.where(node.start_mark.line + 1)

    def construct_located_map(self, node: yaml.MappingNode):
        data = LocatedDict(self._at(node))
        yield data
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:  # before merges (`<<`) are flattened: those may repeat keys
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                lines = f"{seen[key].start_mark.line + 1} and {key_node.start_mark.line + 1}"
                raise RecipeError(f"{self._at(key_node)}: duplicate key {key!r} on lines {lines}")
            seen[key] = key_node
        data.update(self.construct_mapping(node, deep=True))
        for key_node, _ in node.value:
            data.key_locs[self.construct_object(key_node)] = self._at(key_node)

    def construct_located_seq(self, node: yaml.SequenceNode):
        data = LocatedList(self._at(node))
        yield data
        data.extend(self.construct_sequence(node, deep=True))
        data.item_locs = [self._at(item) for item in node.value]

    def construct_yaml12_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
        base = {"0x": 16, "0o": 8}.get(digits[:2], 10)
        try:  # base 10 on purpose: YAML 1.2 reads "010" as ten, not as octal eight
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise RecipeError(f"{self._at(node)}: not an integer: {text!r}") from None

    def construct_yaml12_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node)
        try:
            return float(text.replace(".", "", 1) if text.lower().lstrip("+-") in (".inf", ".nan") else text)
        except ValueError:
            raise RecipeError(f"{self._at(node)}: not a number: {text!r}") from None

    def refuse_python_tag(self, suffix: str, node: yaml.Node):
        raise RecipeError(
            f"{self._at(node)}: tag !!python/{suffix} refused: a recipe is data, and YAML tags that "
            "build Python objects could run code; write the plain value instead"
        )


for _tag, _rx, _first in YAML12_RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _rx, _first)
_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_located_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _Loader.construct_located_seq)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml12_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml12_float)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _Loader.refuse_python_tag)


def _load_yaml(text: str, where: Callable[[int], str]) -> Any:
    loader = _Loader(text, where)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = "; ".join(str(p) for p in (e.context, e.problem) if p)
        raise RecipeError(f"{where(mark.line + 1) if mark else where(0)}: invalid YAML: {detail}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where(0)}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def read_recipe_file(path: str | Path) -> LocatedDict:
    """Parse a recipe file into a `LocatedDict`; refuse empty files and non-mapping documents."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e}") from None
    data = _load_yaml(text, lambda line: f"{path}:{line}" if line else str(path))
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least model:, data: and training:")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: the top level must be a mapping of sections ({', '.join(TOP_LEVEL_KEYS)}), "
            f"not a {type(data).__name__}"
        )
    return data


def parse_yaml_value(text: str, label: str) -> Any:
    """Parse one value (scalar or flow list/mapping) as the recipe reader would, e.g. for overrides."""
    return _load_yaml(text, lambda _line: label)


# --- 2. Coercion by type ---------------------------------------------------------------------------


class _Where:
    """Finds where a dotted key was written, by walking the located tree it came from."""

    def __init__(self, raw: LocatedDict, source: str, stage: Stage | None = None) -> None:
        self.raw, self.source, self.stage = raw, source, stage

    def __call__(self, key: str) -> str:
        node, loc = self.raw, self.source
        for part in key.split("."):
            if isinstance(node, LocatedDict) and part in node:
                loc, node = node.key_locs.get(part, loc), node[part]
            elif isinstance(node, LocatedList) and part.isdigit() and int(part) < len(node):
                loc, node = node.item_locs[int(part)], node[int(part)]
            else:
                break
        return loc


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _closest(word: Any, options: typing.Iterable[Any], cutoff: float = 0.5) -> str | None:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return close[0] if close else None


def _mismatch(key: str, where: _Where, tp: Any, value: Any) -> RecipeError:
    wants_str = tp is str or str in typing.get_args(tp)
    hint = " (quote it if you mean the string)" if wants_str and isinstance(value, bool | int | float) else ""
    return RecipeError(f"{where(key)}: {key}: expected {_type_name(tp)}, got {value!r}{hint}")


def _choice_error(key: str, where: _Where, choices: typing.Iterable[Any], value: Any) -> RecipeError:
    choices = list(choices)
    listed = ", ".join(repr(c) for c in choices)
    return RecipeError(
        f"{where(key)}: {key}: expected one of {listed}; got {value!r}"
        + (f" (did you mean {close!r}?)" if (close := _closest(value, choices)) else "")
    )


def _parse_number(text: str) -> int | float | None:
    """A quoted number ("1e-5", "16") read as the YAML reader would read it unquoted; else None."""
    text = text.strip()
    if any(rx.match(text) for _, rx, _ in YAML12_RESOLVERS[1:]):
        return parse_yaml_value(text, text)
    return None


def _plain(value: Any) -> Any:
    """Located containers -> plain dict/list (for fields typed Any)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _fits(value: Any, tp: Any) -> bool:
    """Whether `value` already has the shape of `tp` (so a Union picks the member written)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(type(a) is type(value) and a == value for a in typing.get_args(tp))
    if tp is bool or tp is type(None):
        return type(value) is tp
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict | tp)
    cls = origin or tp
    return isinstance(cls, type) and isinstance(value, cls)


def coerce(value: Any, tp: Any, key: str, where: _Where) -> Any:
    """Return `value` converted to type hint `tp`, or raise a RecipeError naming `key`, type and value.

    Strings are converted only where the type leaves no doubt: "1e-5" for a float, "yes" for a bool;
    a number or boolean given for a string field is an error, never silently stringified.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _mismatch(key, where, tp, value)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, Enum)]
        if enums and str in args and isinstance(value, str):
            # TrainingArguments turns these strings into the Enum anyway; checking here names the key.
            return coerce(value, enums[0], key, where)
        for member in [a for a in args if _fits(value, a)] or args:
            try:
                return coerce(value, member, key, where)
            except RecipeError:
                if _fits(value, member):
                    raise  # right shape, wrong contents (e.g. a bad list item): that error is the useful one
        raise _mismatch(key, where, tp, value)
    if origin is Literal:
        if _fits(value, tp):
            return value
        raise _choice_error(key, where, args, value)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _mismatch(key, where, tp, value)
        item = args[0] if args else Any
        return [coerce(v, item, f"{key}.{i}", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _mismatch(key, where, tp, value)
        kt, vt = args or (Any, Any)
        return {
            coerce(k, kt, f"{key}.{k}", where): coerce(v, vt, f"{key}.{k}", where) for k, v in value.items()
        }
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, tp):
            return value.value
        if value in {m.value for m in tp}:
            return value  # kept as the plain string: TrainingArguments converts, and it serialises
        raise _choice_error(key, where, [m.value for m in tp], value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build_dataclass(tp, value, key, where)
        raise RecipeError(f"{where(key)}: {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
    if tp is bool:
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        if type(value) is bool:
            return value
        if isinstance(value, str) and value.lower() in words:
            return words[value.lower()]
    elif tp is int or tp is float:
        number = _parse_number(value) if isinstance(value, str) else value
        if isinstance(number, int | float) and not isinstance(number, bool):
            if tp is float:
                return number
            if float(number).is_integer():  # `max_steps: 1e3` means 1000
                return int(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _mismatch(key, where, tp, value)


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str, where: _Where) -> None:
    tests = {"ge": (">=", float.__ge__), "gt": (">", float.__gt__), "le": ("<=", float.__le__)}
    tests["lt"] = ("<", float.__lt__)
    for name, (sign, ok) in tests.items():
        if name in meta and value is not None and not ok(float(value), float(meta[name])):
            raise RecipeError(f"{where(key)}: {key}: must be {sign} {meta[name]}, got {value!r}")
    if meta.get("nonempty") and not value:
        raise RecipeError(f"{where(key)}: {key}: must not be empty")


def _unknown_key(key: str, valid: typing.Iterable[str], prefix: str, where: _Where) -> RecipeError:
    full, valid = f"{prefix}{key}", list(valid)
    if close := _closest(key, valid):
        hint = f"; did you mean {prefix}{close}?"
    else:  # a right key in the wrong section is a common slip
        classes = {**SECTIONS, **({"training": trainer_config_class(where.stage)} if where.stage else {})}
        homes = [s for s, cls in classes.items() if key in {f.name for f in dataclasses.fields(cls)}]
        hint = f"; it belongs in {homes[0]}: (did you mean {homes[0]}.{key}?)" if homes else ""
        hint = hint or (f"; valid keys: {', '.join(valid)}" if len(valid) <= 12 else "")
    return RecipeError(f"{where(full)}: {full}: unknown key{hint}")


def build_dataclass(cls: type, raw: Any, key: str, where: _Where) -> Any:
    """Build dataclass `cls` from mapping `raw` at dotted `key`: unknown keys, types, bounds, required."""
    if raw is None:
        raw = {}  # `lora:` with nothing under it means all defaults
    if not isinstance(raw, dict):
        raise RecipeError(f"{where(key)}: {key}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            raise _unknown_key(str(name), fields, f"{key}.", where)
        kwargs[name] = coerce(value, hints[name], f"{key}.{name}", where)
        _check_bounds(kwargs[name], fields[name].metadata, f"{key}.{name}", where)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise RecipeError(f"{where(key)}: {key}.{name}: required field missing")
    try:
        return cls(**kwargs)
    except Exception as e:  # a foreign dataclass validating itself (e.g. accelerate's ParallelismConfig)
        raise RecipeError(f"{where(key)}: {key}: {e}") from e


# --- 3. The recipe -----------------------------------------------------------------------------------


@functools.cache
def trainer_config_class(stage: Stage) -> type:
    """TRL's config class for a stage (imported on first use: TRL takes seconds to import)."""
    from trl import DPOConfig, SFTConfig

    return {"sft": SFTConfig, "dpo": DPOConfig}[stage]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _looks_local(path: str) -> bool:
    return path.startswith(("./", "../", "/", "~")) or path.lower().endswith(LOCAL_DATA_SUFFIXES)


def _require_path(path: str, key: str, where: _Where, kind: str, directory: bool = False) -> None:
    resolved = Path(path).expanduser().absolute()  # relative to the working directory
    if not (resolved.is_dir() if directory else resolved.exists()):
        raise RecipeError(f"{where(key)}: {key}: no such {kind}: {path!r} (looked for {resolved})")


# Settings both a mixtune section and the TRL config carry (section, field, trainer field): either may
# be set, both only if equal, and the two always agree. TRL's router_aux_loss_coef is the balance-loss
# weight it adds to the loss, None meaning the model config's: exactly router.balance_coef.
_SHARED_SETTINGS = (
    ("data", "max_length", "max_length"),
    ("data", "packing", "packing"),
    ("logging", "run_name", "run_name"),
    ("model", "trust_remote_code", "trust_remote_code"),
    ("router", "balance_coef", "router_aux_loss_coef"),
)


def _build_training(raw: LocatedDict, stage: Stage, sections: dict[str, Any], where: _Where) -> Any:
    cls = trainer_config_class(stage)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    given = raw.get("training")
    if given is not None and not isinstance(given, dict):
        raise RecipeError(f"{where('training')}: training: expected a mapping of {cls.__name__} fields")
    kwargs: dict[str, Any] = {}
    for name, value in (given or {}).items():
        if name not in fields:
            raise _unknown_key(str(name), fields, "training.", where)
        if name == "resume_from_checkpoint" and value is True:
            value = "latest"  # the Trainer's own boolean spelling of "the newest checkpoint"
        kwargs[name] = coerce(value, hints[name], f"training.{name}", where)
        choices = fields[name].metadata.get("choices")
        if choices and isinstance(kwargs[name], str) and kwargs[name] not in choices:
            raise _choice_error(f"training.{name}", where, choices, kwargs[name])

    for section, name, tname in _SHARED_SETTINGS:
        if tname not in fields:
            continue
        sec_obj, sec_key, tkey = sections[section], f"{section}.{name}", f"training.{tname}"
        if tname not in kwargs:
            kwargs[tname] = getattr(sec_obj, name)
        elif name in (raw.get(section) or {}) and kwargs[tname] != getattr(sec_obj, name):
            raise RecipeError(
                f"{where(tkey)}: {tkey} ({kwargs[tname]!r}) contradicts {sec_key} "
                f"({getattr(sec_obj, name)!r}); they are one setting: set {sec_key} only"
            )
        else:
            sec_field = next(f for f in dataclasses.fields(sec_obj) if f.name == name)
            value = coerce(kwargs[tname], typing.get_type_hints(type(sec_obj))[name], tkey, where)
            _check_bounds(value, sec_field.metadata, tkey, where)
            setattr(sec_obj, name, value)

    _apply_trainer_defaults(kwargs, fields, sections, where)
    try:
        return cls(**kwargs)
    except Exception as e:  # TrainingArguments validates in __post_init__; name the section, not a frame
        raise RecipeError(f"{where('training')}: training: {cls.__name__} refused these settings: {e}") from e


def _apply_trainer_defaults(
    kwargs: dict[str, Any], fields: dict, sections: dict[str, Any], where: _Where
) -> None:
    """mixtune's defaults where the recipe is silent, and the trainer-level impossible combinations."""
    if kwargs.get("output_dir") is None:
        raise RecipeError(
            f"{where('training.output_dir')}: training.output_dir: required (checkpoints and the resolved recipe go there)"
        )
    wandb = sections["logging"].wandb
    if "report_to" not in kwargs:
        kwargs["report_to"] = ["wandb"] if wandb else "none"
    reports = kwargs["report_to"] if isinstance(kwargs["report_to"], list) else [kwargs["report_to"]]
    if wandb and not {"wandb", "all"} & set(reports):
        raise RecipeError(
            f"{where('training.report_to')}: logging.wandb is true but training.report_to is "
            f"{kwargs['report_to']!r}; add 'wandb' to it or leave it unset"
        )
    if "wandb" in reports and not wandb:
        raise RecipeError(
            f"{where('training.report_to')}: training.report_to names wandb; set logging.wandb: true "
            "instead (it also carries the project, group and tags)"
        )
    if wandb and importlib.util.find_spec("wandb") is None:
        raise RecipeError(f"{where('logging.wandb')}: logging.wandb: true, but wandb is not installed")

    # TRL defaults `gradient_checkpointing` to True, and transformers warns that the name is deprecated
    # whenever it is the only one set; passing the same default under the new name keeps runs quiet.
    if (
        not {"activation_checkpointing", "gradient_checkpointing"} & kwargs.keys()
        and "activation_checkpointing" in fields
    ):
        kwargs["activation_checkpointing"] = fields["gradient_checkpointing"].default

    if kwargs.get("bf16") and kwargs.get("fp16"):
        raise RecipeError(
            f"{where('training.bf16')}: training.bf16 and training.fp16 are both true; pick one"
        )
    gpu = _cuda_available()
    if not gpu and "dataloader_pin_memory" not in kwargs:
        kwargs["dataloader_pin_memory"] = False  # pinning needs an accelerator; torch warns every epoch
    if kwargs.get("bf16") is None and (not gpu or kwargs.get("use_cpu")):
        kwargs["bf16"] = False  # TRL asks for bf16 by default, which fails without a CUDA GPU
    for flag in ("bf16", "fp16"):
        if kwargs.get(flag) and not gpu and not kwargs.get("use_cpu"):
            raise RecipeError(
                f"{where(f'training.{flag}')}: training.{flag}: true, but no CUDA GPU is available here; "
                f"set training.{flag}: false (or training.use_cpu: true for CPU mixed precision)"
            )

    data = sections["data"]
    strategy = kwargs.get("eval_strategy", fields["eval_strategy"].default)
    if getattr(strategy, "value", strategy) != "no" and not data.eval and not data.eval_fraction:
        raise RecipeError(
            f"{where('training.eval_strategy')}: training.eval_strategy is {strategy!r} but there is no "
            "evaluation data; set data.eval or data.eval_fraction, or eval_strategy: 'no'"
        )


def _check_preset(model: Any, where: _Where) -> None:
    """A known preset, and overrides that are Mixtral config fields (a typo must not pass silently)."""
    from mixtune.model.config import PRESETS, MixtralConfig

    if model.preset not in PRESETS:
        raise _choice_error("model.name_or_path", where, [f"preset:{p}" for p in PRESETS], model.name_or_path)
    valid = {f.name for f in dataclasses.fields(MixtralConfig)} | {"rope_theta"}
    for key in model.config_overrides:
        if key not in valid:
            raise _unknown_key(str(key), valid, "model.config_overrides.", where)
    try:
        MixtralConfig.preset(model.preset, **model.config_overrides)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where('model.config_overrides')}: model.config_overrides: {e}") from None


def _check_sections(sections: dict[str, Any], stage: Stage, where: _Where) -> None:
    """Impossible combinations and missing paths in mixtune's own sections."""
    model, data, lora, router = (sections[k] for k in ("model", "data", "lora", "router"))
    if model.preset is None:
        if model.config_overrides:
            raise RecipeError(
                f"{where('model.config_overrides')}: model.config_overrides: only allowed with a preset "
                "model (name_or_path: preset:<name>); a checkpoint's config.json fixes its shape"
            )
        _require_path(model.name_or_path, "model.name_or_path", where, "model directory", directory=True)
    elif not model.preset:
        raise RecipeError(f"{where('model.name_or_path')}: model.name_or_path: 'preset:' needs a name")
    else:
        _check_preset(model, where)
    if model.tokenizer and _looks_local(model.tokenizer):
        _require_path(model.tokenizer, "model.tokenizer", where, "tokenizer path")
    if model.load_in_4bit and not lora.enabled:
        raise RecipeError(
            f"{where('model.load_in_4bit')}: model.load_in_4bit needs lora.enabled: 4-bit weights cannot "
            "be trained directly"
        )

    for split in ("train", "eval"):
        for i, source in enumerate(getattr(data, split)):
            key = f"data.{split}.{i}"
            if _looks_local(source.path):
                _require_path(source.path, f"{key}.path", where, "data file")
            if stage == "dpo" and source.format in ("messages", "alpaca", "sharegpt"):
                raise RecipeError(
                    f"{where(key + '.format')}: {key}.format: {source.format!r} has no rejected responses; "
                    "DPO needs 'preference', 'hh' or 'auto'"
                )
    if data.eval and data.eval_fraction:
        raise RecipeError(
            f"{where('data.eval_fraction')}: data.eval and data.eval_fraction are both set; "
            "use one way of getting evaluation data"
        )
    if data.packing and stage == "dpo":
        raise RecipeError(
            f"{where('data.packing')}: data.packing: not supported for DPO (pairs are not packed)"
        )

    for i, target in enumerate(lora.targets):
        key = f"lora.targets.{i}"
        if target not in LORA_TARGETS:
            is_router = target in ("gate", "router", "block_sparse_moe.gate", "mlp.gate")
            why = "the router trains through router.policy, never as a LoRA target"
            why = why if is_router else f"did you mean {_closest(target, LORA_TARGETS, cutoff=0)!r}?"
            raise RecipeError(
                f"{where(key)}: {key}: unknown LoRA target {target!r} ({why}); valid: {', '.join(LORA_TARGETS)}"
            )
        if target in lora.targets[:i]:
            raise RecipeError(f"{where(key)}: {key}: {target!r} is listed twice")
    if lora.init_from is not None:
        if not lora.enabled:
            raise RecipeError(f"{where('lora.init_from')}: lora.init_from needs lora.enabled: true")
        _require_path(lora.init_from, "lora.init_from", where, "adapter directory", directory=True)
    if router.policy == "lora" and not lora.enabled:
        raise RecipeError(f"{where('router.policy')}: router.policy: lora needs lora.enabled: true")


def build_recipe(raw: LocatedDict, stage: Stage, source: str | Path) -> Recipe:
    """Turn a parsed (and overridden) recipe tree into a validated `Recipe` for `stage`."""
    source = str(source)
    where = _Where(raw, source, stage)
    if stage not in ("sft", "dpo"):
        raise RecipeError(f"{source}: unknown stage {stage!r}; expected 'sft' or 'dpo'")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key(str(key), TOP_LEVEL_KEYS, "", where)
    if "stage" in raw and coerce(raw["stage"], Stage, "stage", where) != stage:
        raise RecipeError(
            f"{where('stage')}: stage: this recipe is for {raw['stage']!r}, but was loaded for {stage!r} "
            f"(use mixtune.{raw['stage']})"
        )
    for required in ("model", "data"):
        if required not in raw:
            raise RecipeError(f"{source}: {required}: required section missing")
    sections = {name: build_dataclass(cls, raw.get(name), name, where) for name, cls in SECTIONS.items()}
    _check_sections(sections, stage, where)
    training = _build_training(raw, stage, sections, where)
    return Recipe(stage=stage, training=training, source=Path(source), **sections)
