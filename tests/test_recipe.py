"""Recipes: safe YAML, coercion by type, clear errors, overrides, redaction, and every repo YAML loads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from mixtune.recipe import (
    RecipeError,
    load_recipe,
    recipe_from_argv,
    recipe_to_dict,
    save_resolved_recipe,
    split_argv,
)
from mixtune.recipe import loader as recipe_loader
from mixtune.recipe.loader import coerce, read_recipe_file, trainer_config_class

REPO = Path(__file__).resolve().parents[1]

BASE = """\
model:
  name_or_path: preset:tiny
data:
  train:
    - path: train.jsonl
training:
  output_dir: out
"""
PREF_BASE = BASE.replace("train.jsonl", "pref.jsonl")
HF_TOKEN = "hf_" + "aB3" * 12  # the shape of a Hugging Face token
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits, the shape of a W&B key


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch):
    """Each test runs in its own directory with two data files, on a machine without a CUDA GPU."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "pref.jsonl").write_text('{"prompt": [], "chosen": [], "rejected": []}\n')
    monkeypatch.setattr(recipe_loader, "_cuda_available", lambda: False)
    return tmp_path


def write(text: str, name: str = "recipe.yaml") -> Path:
    path = Path(name)
    path.write_text(textwrap.dedent(text))
    return path


def load(text: str, stage: str = "sft", overrides: typing.Sequence[str] = ()):
    return load_recipe(write(text), stage, overrides)


def error(text: str, stage: str = "sft", overrides: typing.Sequence[str] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load(text, stage, overrides)
    return str(info.value)


def with_training(**fields) -> str:
    return BASE + "".join(f"  {k}: {v}\n" for k, v in fields.items())


# --- loading and defaults ----------------------------------------------------------------------------


def test_minimal_recipe_gets_mixtune_defaults():
    from trl import DPOConfig, SFTConfig

    sft = load(BASE)
    assert isinstance(sft.training, SFTConfig) and sft.stage == "sft"
    assert sft.model.name_or_path == "preset:tiny" and sft.model.preset == "tiny"
    assert sft.data.train[0].path == "train.jsonl" and sft.data.train[0].format == "auto"
    assert sft.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    assert sft.router.policy == "frozen" and sft.logging.wandb is False
    assert sft.training.report_to == [] or sft.training.report_to == "none"
    assert sft.training.bf16 is False  # no CUDA GPU and the recipe did not ask
    assert sft.training.max_length == sft.data.max_length == 1024
    dpo = load(PREF_BASE, "dpo")
    assert isinstance(dpo.training, DPOConfig) and dpo.stage == "dpo"


def test_wandb_sets_report_to():
    recipe = load(BASE + "logging:\n  wandb: true\n  project: p\n")
    assert recipe.training.report_to == ["wandb"]


def test_every_trainer_field_type_is_understood():
    """Each field of SFTConfig and DPOConfig accepts its own default back: no type hint is unsupported."""
    where = recipe_loader._Where(recipe_loader.LocatedDict("x"), "x")
    for stage in ("sft", "dpo"):
        cls = trainer_config_class(stage)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if default is dataclasses.MISSING:
                continue
            default = getattr(default, "value", default)
            coerce(default, hints[f.name], f"training.{f.name}", where)


def test_trainer_fields_of_every_shape_are_settable():
    recipe = load(
        with_training(
            learning_rate="3e-4",
            lr_scheduler_type="cosine",
            lr_scheduler_kwargs="{num_cycles: 2}",
            report_to="[tensorboard]",
            include_num_input_tokens_seen="true",
            trackio_static_space_id="false",
            debug="[underflow_overflow]",
            save_strategy="no",
            max_steps="1e3",
            optim="adamw_torch",
            activation_checkpointing="false",
        )
    )
    t = recipe.training
    assert t.learning_rate == 3e-4 and t.max_steps == 1000 and t.save_strategy == "no"
    assert t.lr_scheduler_kwargs == {"num_cycles": 2} and t.report_to == ["tensorboard"]
    assert t.activation_checkpointing is False


def test_nested_trainer_dataclasses_are_checked_like_sections():
    msg = error(with_training(parallelism_config="{tp_sise: 1}"))
    assert (
        "training.parallelism_config.tp_sise: unknown key; did you mean training.parallelism_config.tp_size?"
        in msg
    )


def test_trainer_choices_from_field_metadata_are_checked():
    msg = error(with_training(ddp_backend="glooo"))
    assert "training.ddp_backend" in msg and "'nccl'" in msg and "did you mean 'gloo'" in msg


# --- the YAML reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tagged",
    [
        '!!python/object/apply:os.system ["touch pwned"]',
        "!!python/name:os.system",
        '!!python/object/new:subprocess.Popen [["touch", "pwned"]]',
    ],
)
def test_python_tags_are_refused_with_file_and_line(tagged):
    msg = error(BASE + f"  run_name: {tagged}\n")
    assert msg.startswith("recipe.yaml:8:") and "!!python/" in msg and "refused" in msg
    assert not Path("pwned").exists()


def test_unknown_tags_are_an_error():
    assert error(BASE + "  run_name: !include other.yaml\n").startswith("recipe.yaml:8:")


def test_duplicate_keys_name_the_key_and_both_lines():
    msg = error(BASE + "  learning_rate: 1e-4\n  seed: 1\n  learning_rate: 2e-4\n")
    assert msg.startswith("recipe.yaml:10:") and "duplicate key 'learning_rate' on lines 8 and 10" in msg
    msg = error("model:\n  name_or_path: preset:tiny\n" + BASE)
    assert msg.startswith("recipe.yaml:3:") and "duplicate key 'model' on lines 1 and 3" in msg


def test_merge_keys_may_repeat_what_they_merge():
    text = BASE.replace(
        "    - path: train.jsonl\n",
        "    - &src {path: train.jsonl, weight: 2.0}\n  eval:\n    - <<: *src\n      weight: 1.0\n",
    )
    recipe = load(text)
    assert recipe.data.train[0].weight == 2.0
    assert recipe.data.eval[0].path == "train.jsonl" and recipe.data.eval[0].weight == 1.0


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_recipe_names_the_file(text):
    assert re.match(r"recipe\.yaml: the recipe is empty", error(text))


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(text):
    msg = error(text)
    assert msg.startswith("recipe.yaml: the top level must be a mapping")


def test_missing_file_and_bad_yaml():
    with pytest.raises(RecipeError, match=r"^nope\.yaml: no such recipe file"):
        load_recipe("nope.yaml", "sft")
    assert error("model: [unclosed\n").startswith("recipe.yaml:2: invalid YAML")


# --- YAML 1.1 traps ----------------------------------------------------------------------------------


def test_yaml11_traps_are_resolved_by_field_type():
    recipe = load(
        with_training(learning_rate="1e-5", save_strategy="no", weight_decay="'1e-2'", max_steps="1e2")
        + "logging:\n  project: on\n  group: 2024-01-01\n  tags: [yes, off]\nlora:\n  enabled: yes\n"
    )
    t = recipe.training
    assert t.learning_rate == 1e-5 and isinstance(t.learning_rate, float)
    assert t.save_strategy == "no"  # the string, not False
    assert t.weight_decay == 0.01 and t.max_steps == 100
    assert recipe.logging.project == "on" and recipe.logging.group == "2024-01-01"
    assert recipe.logging.tags == ["yes", "off"]
    assert recipe.lora.enabled is True  # "yes" for a bool field is a yes


def test_yaml12_numbers():
    raw = read_recipe_file(write("a: 010\nb: 0x1F\nc: 0o17\nd: .inf\ne: 1_000\nf: 1.5e3\ng: -3\n"))
    assert dict(raw) == {"a": 10, "b": 31, "c": 15, "d": float("inf"), "e": "1_000", "f": 1500.0, "g": -3}


# --- unknown keys, wrong types, missing fields -------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            with_training(learnig_rate="1e-4"),
            "recipe.yaml:8: training.learnig_rate: unknown key; did you mean training.learning_rate?",
        ),
        (BASE + "lora:\n  alpah: 8\n", "recipe.yaml:9: lora.alpah: unknown key; did you mean lora.alpha?"),
        (BASE + "trainig:\n  seed: 1\n", "recipe.yaml:8: trainig: unknown key; did you mean training?"),
        (
            BASE.replace("path: train.jsonl", "pth: train.jsonl"),
            "recipe.yaml:5: data.train.0.pth: unknown key; did you mean data.train.0.path?",
        ),
        (
            BASE + "lora:\n  learning_rate: 1\n",
            "lora.learning_rate: unknown key; it belongs in training: (did you mean training.learning_rate?)",
        ),
        (
            BASE + "router:\n  zzz: 1\n",
            "router.zzz: unknown key; valid keys: policy, balance_coef, z_loss_coef, balance_scope",
        ),
    ],
)
def test_unknown_keys_name_the_dotted_key_and_closest_match(text, expected):
    assert expected in error(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE + "lora:\n  r: sixteen\n", "recipe.yaml:9: lora.r: expected int, got 'sixteen'"),
        (BASE + "lora:\n  r: 1.5\n", "lora.r: expected int, got 1.5"),
        (BASE + "lora:\n  targets: q_proj\n", "lora.targets: expected list[str], got 'q_proj'"),
        (BASE + "lora:\n  enabled: maybe\n", "lora.enabled: expected bool, got 'maybe'"),
        (with_training(num_train_epochs="many"), "training.num_train_epochs: expected float, got 'many'"),
        (with_training(report_to="[1]"), "training.report_to.0: expected str, got 1"),
        (BASE + "logging:\n  run_name: 2024\n", "logging.run_name: expected str | null, got 2024 (quote it"),
        (BASE + "logging:\n  tags: [a, 1.10]\n", "logging.tags.1: expected str, got 1.1"),
        (BASE + "lora: 3\n", "recipe.yaml:8: lora: expected a mapping of LoraSection fields, got 3"),
        (BASE + "lora:\n  r: 0\n", "lora.r: must be >= 1, got 0"),
        (BASE + "data_x: 1\n", "data_x: unknown key; did you mean data?"),
    ],
)
def test_wrong_types_name_key_expected_type_and_value(text, expected):
    assert expected in error(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            BASE + "router:\n  policy: trained\n",
            "router.policy: expected one of 'frozen', 'lora', 'full'; got 'trained'",
        ),
        (
            BASE.replace("  train:", "  overlong: trunc\n  train:"),
            "data.overlong: expected one of 'truncate', 'drop', 'error'; got 'trunc' (did you mean 'truncate'?)",
        ),
        (
            BASE.replace("preset:tiny\n", "preset:tiny\n  dtype: fp32\n"),
            "model.dtype: expected one of 'float32', 'bfloat16', 'float16'; got 'fp32'",
        ),
        (
            with_training(lr_scheduler_type="cosin"),
            "training.lr_scheduler_type: expected one of 'linear', 'cosine'",
        ),
        ("stage: ppo\n" + BASE, "stage: expected one of 'sft', 'dpo'; got 'ppo'"),
    ],
)
def test_literal_fields_list_the_allowed_values(text, expected):
    assert expected in error(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            BASE.replace("model:\n  name_or_path: preset:tiny\n", ""),
            "recipe.yaml: model: required section missing",
        ),
        (
            BASE.replace("  name_or_path: preset:tiny\n", "  dtype: float32\n"),
            "recipe.yaml:1: model.name_or_path: required field missing",
        ),
        (
            BASE.replace("  train:\n    - path: train.jsonl\n", "  max_length: 8\n"),
            "data.train: required field missing",
        ),
        (BASE.replace("\n    - path: train.jsonl", " []"), "recipe.yaml:4: data.train: must not be empty"),
        (BASE.replace("training:\n  output_dir: out\n", ""), "training.output_dir: required"),
        (
            BASE.replace("  output_dir: out\n", "  output_dir: null\n"),
            "recipe.yaml:7: training.output_dir: required",
        ),
    ],
)
def test_missing_required_fields_are_named(text, expected):
    assert expected in error(text)


# --- impossible combinations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            "model:\n  name_or_path: preset:tiny\n  load_in_4bit: true\nlora:\n  enabled: false\n",
            "model.load_in_4bit needs lora.enabled",
        ),
        ("lora:\n  enabled: false\nrouter:\n  policy: lora\n", "router.policy: lora needs lora.enabled"),
        ("lora:\n  enabled: false\n  init_from: ./adapter\n", "lora.init_from needs lora.enabled"),
        (
            "lora:\n  targets: [q_proj, gate]\n",
            "lora.targets.1: unknown LoRA target 'gate' (the router trains through router.policy",
        ),
        ("lora:\n  targets: [w4]\n", "lora.targets.0: unknown LoRA target 'w4' (did you mean"),
        ("lora:\n  targets: [q_proj, q_proj]\n", "lora.targets.1: 'q_proj' is listed twice"),
        ("model:\n  name_or_path: 'preset:'\n", "model.name_or_path: 'preset:' needs a name"),
        (
            "training:\n  output_dir: out\n  bf16: true\n  fp16: true\n",
            "training.bf16 and training.fp16 are both true",
        ),
        (
            "training:\n  output_dir: out\n  eval_strategy: steps\n",
            "training.eval_strategy is 'steps' but there is no evaluation data",
        ),
        (
            "training:\n  output_dir: out\n  report_to: [tensorboard]\nlogging:\n  wandb: true\n",
            "logging.wandb is true but training.report_to",
        ),
        ("training:\n  output_dir: out\n  report_to: wandb\n", "set logging.wandb: true instead"),
        (
            "training:\n  output_dir: out\n  max_length: 64\ndata:\n  train: [{path: train.jsonl}]\n  max_length: 32\n",
            "training.max_length (64) contradicts data.max_length (32)",
        ),
    ],
)
def test_impossible_combinations_are_refused(extra, expected):
    text = BASE
    for section in re.findall(r"^(\w+):", extra, re.M):  # the extra sections replace BASE's
        text = re.sub(rf"^{section}:\n(  .*\n)*", "", text, flags=re.M)
    assert expected in error(text + extra)


def test_config_overrides_need_a_preset(workdir):
    (workdir / "ckpt").mkdir()
    text = BASE.replace("preset:tiny", "./ckpt")
    assert load(text).model.name_or_path == "./ckpt"
    text = text.replace("./ckpt\n", "./ckpt\n  config_overrides: {num_local_experts: 4}\n")
    assert "model.config_overrides: only allowed with a preset" in error(text)
    preset = load(BASE.replace("preset:tiny\n", "preset:tiny\n  config_overrides: {num_local_experts: 4}\n"))
    assert preset.model.config_overrides == {"num_local_experts": 4}


def test_eval_and_eval_fraction_are_exclusive():
    text = BASE.replace("  train:", "  eval_fraction: 0.1\n  eval: [{path: train.jsonl}]\n  train:")
    assert "data.eval and data.eval_fraction are both set" in error(text)
    assert load(BASE.replace("  train:", "  eval_fraction: 0.1\n  train:")).data.eval_fraction == 0.1


def test_packing_is_sft_only():
    text = PREF_BASE.replace("  train:", "  packing: true\n  train:")
    assert "data.packing: not supported for DPO" in error(text, "dpo")
    recipe = load(BASE.replace("  train:", "  packing: true\n  train:"))
    assert recipe.data.packing is True and recipe.training.packing is True


def test_settings_shared_with_the_trainer_config_agree():
    recipe = load(BASE + "router:\n  balance_coef: 0.02\nlogging:\n  run_name: r1\n")
    assert recipe.training.router_aux_loss_coef == 0.02 and recipe.training.run_name == "r1"
    recipe = load(with_training(router_aux_loss_coef="0.05", max_length="128"))
    assert recipe.router.balance_coef == 0.05 and recipe.data.max_length == 128
    assert load(BASE).training.router_aux_loss_coef is None  # both mean: the model config's coefficient
    msg = error(with_training(router_aux_loss_coef="0.05") + "router:\n  balance_coef: 0.01\n")
    assert "training.router_aux_loss_coef (0.05) contradicts router.balance_coef (0.01)" in msg
    assert "recipe.yaml:8: training.max_length: must be >= 1, got 0" in error(with_training(max_length="0"))


def test_dpo_refuses_formats_without_pairs():
    text = PREF_BASE.replace("- path: pref.jsonl", "- path: pref.jsonl\n      format: messages")
    assert "data.train.0.format: 'messages' has no rejected responses" in error(text, "dpo")


def test_stage_key_must_match_the_entry_point():
    assert "this recipe is for 'dpo', but was loaded for 'sft'" in error("stage: dpo\n" + BASE)
    assert load("stage: sft\n" + BASE).stage == "sft"


# --- paths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["missing.jsonl", "./missing", "data/missing.parquet", "/nonexistent/x.json"]
)
def test_missing_local_data_paths_are_named(path):
    msg = error(BASE.replace("path: train.jsonl", f"path: {path}"))
    assert msg.startswith("recipe.yaml:5: data.train.0.path: no such data file") and repr(path) in msg


def test_relative_paths_resolve_against_the_working_directory(workdir, monkeypatch):
    recipe = write(BASE.replace("path: train.jsonl", "path: sub/train.jsonl"))
    (workdir / "elsewhere" / "sub").mkdir(parents=True)
    (workdir / "elsewhere" / "sub" / "train.jsonl").write_text("{}\n")
    with pytest.raises(RecipeError, match="no such data file"):
        load_recipe(recipe, "sft")
    monkeypatch.chdir(workdir / "elsewhere")
    assert load_recipe(workdir / recipe, "sft").data.train[0].path == "sub/train.jsonl"


def test_hub_dataset_ids_are_not_checked_locally():
    recipe = load(BASE.replace("path: train.jsonl", "path: HuggingFaceH4/ultrachat_200k"))
    assert recipe.data.train[0].path == "HuggingFaceH4/ultrachat_200k"


def test_missing_model_adapter_and_tokenizer_paths():
    assert "model.name_or_path: no such model directory: './ckpt'" in error(
        BASE.replace("preset:tiny", "./ckpt")
    )
    assert "lora.init_from: no such adapter directory" in error(BASE + "lora:\n  init_from: ./adapter\n")
    text = BASE.replace("preset:tiny\n", "preset:tiny\n  tokenizer: ./tok\n")
    assert "model.tokenizer: no such tokenizer path" in error(text)


# --- precision and the trainer config's own checks --------------------------------------------------


def test_bf16_on_a_cpu_only_machine_is_explained():
    msg = error(with_training(bf16="true"))
    assert msg.startswith("recipe.yaml:8: training.bf16: true, but no CUDA GPU") and "use_cpu" in msg
    assert load(with_training(bf16="true", use_cpu="true")).training.bf16 is True  # CPU autocast


def test_bf16_left_to_trl_when_a_gpu_is_there(monkeypatch):
    recipe = load(BASE)
    sections = {"logging": recipe.logging, "data": recipe.data}
    monkeypatch.setattr(recipe_loader, "_cuda_available", lambda: True)
    kwargs = {"output_dir": "out"}
    fields = {f.name: f for f in dataclasses.fields(trainer_config_class("sft"))}
    recipe_loader._apply_trainer_defaults(kwargs, fields, sections, recipe_loader._Where({}, "r"))
    assert "bf16" not in kwargs  # TRL then picks bf16 unless fp16 is set


def test_trainer_config_errors_become_recipe_errors():
    msg = error(with_training(logging_steps="1.5"))
    assert msg.startswith("recipe.yaml:6: training: SFTConfig refused these settings:")
    assert "logging_steps" in msg
    msg = error(PREF_BASE + "  loss_weights: [1.0, 2.0]\n", "dpo")
    assert msg.startswith("recipe.yaml:6: training: DPOConfig refused") and "loss_weights" in msg


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_set_values_lists_and_list_items(workdir):
    (workdir / "other.jsonl").write_text("{}\n")
    recipe = load(
        BASE,
        overrides=[
            "training.learning_rate=1e-4",
            "lora.targets=[q_proj,v_proj]",
            "data.train.0.path=other.jsonl",
            "data.eval.0.path=train.jsonl",
            "data.train.1.path=org/dataset",
            "training.save_strategy=no",
            "logging.tags=[a, b]",
            "lora.r=8",
        ],
    )
    assert recipe.training.learning_rate == 1e-4 and recipe.training.save_strategy == "no"
    assert recipe.lora.targets == ["q_proj", "v_proj"] and recipe.lora.r == 8
    assert [s.path for s in recipe.data.train] == ["other.jsonl", "org/dataset"]
    assert recipe.data.eval[0].path == "train.jsonl" and recipe.logging.tags == ["a", "b"]


def test_override_errors_name_file_override_and_closest_key():
    msg = error(BASE, overrides=["training.learnig_rate=1e-4"])
    assert msg.startswith(
        "recipe.yaml (override 'training.learnig_rate=1e-4'): training.learnig_rate: unknown key"
    )
    assert "did you mean training.learning_rate?" in msg
    assert "lora.r: expected int, got 'big'" in error(BASE, overrides=["lora.r=big"])
    assert "refused" in error(BASE, overrides=["training.run_name=!!python/name:os.system"])
    assert "data.train is a list of 1 item(s)" in error(BASE, overrides=["data.train.5.path=x"])
    assert "model.name_or_path is 'preset:tiny', not a mapping" in error(
        BASE, overrides=["model.name_or_path.x=1"]
    )


@pytest.mark.parametrize("bad", ["training.learning_rate", "--training.learning_rate", "=1", "a..b=1"])
def test_malformed_overrides_show_the_syntax(bad):
    msg = error(BASE, overrides=[bad])
    assert msg.startswith("recipe.yaml") and "dotted.key=value" in msg
    with pytest.raises(RecipeError, match="dotted.key=value"):
        split_argv(["r.yaml", bad])


def test_split_argv():
    assert split_argv(["r.yaml", "a.b=1", "c=[x,y]"]) == ("r.yaml", ["a.b=1", "c=[x,y]"])
    assert split_argv(["r.yaml"]) == ("r.yaml", [])
    for argv in ([], ["--help"], ["training.seed=1", "r.yaml"]):
        with pytest.raises(RecipeError, match="usage"):
            split_argv(argv)


def test_recipe_from_argv_exits_with_the_message(capsys):
    write(BASE)
    assert recipe_from_argv("sft", ["recipe.yaml", "lora.r=4"]).lora.r == 4
    with pytest.raises(SystemExit) as info:
        recipe_from_argv("sft", ["recipe.yaml", "lora.rank=4"])
    assert info.value.code == 2
    assert (
        "mixtune.sft: recipe.yaml (override 'lora.rank=4'): lora.rank: unknown key" in capsys.readouterr().err
    )


# --- writing out, secrets ----------------------------------------------------------------------------


def test_resolved_recipe_round_trips(workdir):
    for stage, text in (("sft", BASE), ("dpo", PREF_BASE)):
        recipe = load(text + "  learning_rate: 1e-5\n  save_strategy: no\n", stage)
        saved = save_resolved_recipe(recipe, f"out/{stage}.yaml")
        again = load_recipe(saved, stage)
        assert recipe_to_dict(again) == recipe_to_dict(recipe)
        assert json.loads(json.dumps(recipe_to_dict(recipe))) == recipe_to_dict(recipe)
        assert recipe_to_dict(recipe)["training"]["save_strategy"] == "no"
    json_path = save_resolved_recipe(recipe, "out/dpo.json")
    assert json.loads(json_path.read_text())["stage"] == "dpo"


def test_secrets_are_redacted_and_the_recipe_untouched(monkeypatch):
    env_secret = "s3cr3t-from-the-environment"
    monkeypatch.setenv("WANDB_API_KEY", env_secret)
    text = with_training(
        hub_token=HF_TOKEN,
        hub_revision="a" * 40,  # a commit, not a key
        hub_model_id=f"me/model-{env_secret}",
        eos_token="'</s>'",
        model_init_kwargs="{api_key: plain, name: x}",
    )
    text = text.replace("preset:tiny\n", f"preset:tiny\n  tokenizer: {HF_TOKEN}\n")
    text += f"logging:\n  group: {WANDB_KEY}\n  tags: [ok, 'url-with-{HF_TOKEN}']\n"
    recipe = load(text)
    out = recipe_to_dict(recipe)
    assert out["training"]["hub_token"] == "***"
    assert out["training"]["model_init_kwargs"] == {"api_key": "***", "name": "x"}
    assert out["model"]["tokenizer"] == "***" and out["logging"]["group"] == "***"
    assert out["logging"]["tags"] == ["ok", "url-with-***"]
    assert out["training"]["hub_model_id"] == "me/model-***"
    assert out["training"]["hub_revision"] == "a" * 40 and out["training"]["eos_token"] == "</s>"
    # the recipe itself keeps what the run needs
    assert recipe.training.hub_token == HF_TOKEN and recipe.training.model_init_kwargs["api_key"] == "plain"
    written = save_resolved_recipe(recipe, "out/resolved.yaml").read_text()
    for secret in (HF_TOKEN, WANDB_KEY, env_secret, "plain"):
        assert secret not in written


# --- every YAML file in the repository ---------------------------------------------------------------


@contextlib.contextmanager
def launched_world(recipe_path: Path):
    """A one-process torch.distributed world, as `accelerate launch` would set up, when the recipe needs it.

    TrainingArguments sets up its device while it is built, and `ddp_backend` or `deepspeed` make that
    join a process group, which only exists inside a launcher.
    """
    training = read_recipe_file(recipe_path).get("training") or {}
    if not {"ddp_backend", "deepspeed"} & set(training):
        yield
        return
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")  # accelerate sets it; undo on exit
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            AcceleratorState._reset_state(reset_partial_state=True)


def test_a_recipe_for_a_gloo_launch_loads():
    path = write(with_training(ddp_backend="gloo", use_cpu="true"))
    with launched_world(path):
        assert load_recipe(path, "sft").training.ddp_backend == "gloo"


def _repo_yaml() -> list[Path]:
    return sorted(p for folder in ("recipes", "configs") for p in (REPO / folder).rglob("*.y*ml"))


@pytest.mark.parametrize(
    "path", _repo_yaml() or [None], ids=lambda p: str(p.relative_to(REPO)) if p else "none"
)
def test_repo_yaml_files_load(path, monkeypatch):
    if path is None:
        pytest.skip("no YAML files under recipes/ or configs/ yet")
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    if path.relative_to(REPO).parts[0] == "configs":  # Accelerate configs: not recipes, just safe YAML
        assert isinstance(read_recipe_file(path), dict)
        return
    if path.name.startswith("pipeline"):  # a pipeline file names two stage recipes, which load too
        from mixtune.pipeline import read_spec

        spec = read_spec(path)
        assert (REPO / spec.sft).is_file() and (REPO / spec.dpo).is_file()
        return
    stage = "dpo" if "dpo" in path.relative_to(REPO).parts[:-1] or path.name.startswith("dpo") else "sft"
    import torch

    gpu = torch.cuda.is_available()
    monkeypatch.setattr(recipe_loader, "_cuda_available", lambda: gpu)
    raw = read_recipe_file(path)
    training = raw.get("training") or {}
    # On a CPU machine a GPU recipe's mixed precision is checked as CPU autocast; the rest as written.
    cpu_only = not gpu and (training.get("bf16") or training.get("fp16"))
    overrides = ["training.use_cpu=true"] if cpu_only else []
    # Paths another stage produces (runs/...) or a user downloads (/models/...) are not here: stand
    # in for them and check everything else in the recipe as written.
    stand_ins = {
        "model.name_or_path": "model.name_or_path=preset:tiny",
        "lora.init_from": "lora.init_from=null",
    }
    for _ in range(len(stand_ins) + 1):
        try:
            with launched_world(path):
                recipe = load_recipe(path, stage, overrides)
            break
        except RecipeError as e:
            missing = [
                key for key in stand_ins if f"{key}: no such" in str(e) and stand_ins[key] not in overrides
            ]
            if not missing:
                raise
            overrides.append(stand_ins[missing[0]])
    assert yaml.safe_load(json.dumps(recipe_to_dict(recipe)))["stage"] == recipe.stage


@pytest.mark.parametrize(
    "overrides,message",
    [
        # YAML reads `{hidden_size:64}` (no space) as one key "hidden_size:64": never silently ignored.
        (["model.config_overrides={hidden_size:64}"], "model.config_overrides.hidden_size:64: unknown key"),
        (["model.config_overrides={hiden_size: 64}"], "hidden_size"),
        (["model.config_overrides={num_experts_per_tok: 9}"], "cannot pick more experts than exist"),
        (["model.name_or_path=preset:mixtral-9x9b"], "preset:mixtral-8x7b"),
    ],
)
def test_preset_overrides_are_checked(overrides, message):
    assert message in error(BASE, overrides=overrides)


def test_resume_true_means_the_latest_checkpoint():
    recipe = load(BASE, overrides=["training.resume_from_checkpoint=true"])
    assert recipe.training.resume_from_checkpoint == "latest"
