"""mixtune.doctor: passes the tiny recipes, fails what would break a run, stands in for a model too big here."""

from __future__ import annotations

import io
import json
import re

import pytest

from mixtune import doctor
from mixtune.model import MixtralConfig
from mixtune.preflight.model_checks import BuiltModel, check_adapters
from mixtune.preflight.report import Report
from mixtune.recipe import load_recipe, save_resolved_recipe
from mixtune.tokenizer import load_tokenizer, save_tokenizer
from mixtune.train.model_loading import load_base_model
from mixtune.train.setup import build_model
from tests.conftest import REPO

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"
FEW_ROWS = ["data.train.0.limit=32", "data.eval.0.limit=8"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def run(capsys, *argv: str) -> tuple[int, dict[str, str]]:
    """Exit code and {check: status} of one doctor run."""
    code = doctor.main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    statuses = {}
    for line in lines:
        if match := re.match(r"^(PASS|WARN|FAIL|SKIP)  (.{14})  ", line):
            statuses[match.group(2).strip()] = match.group(1)
    return code, statuses


@pytest.fixture
def sft_output(tmp_path):
    """What an SFT run leaves: weights, tokenizer and the resolved recipe that made them."""
    out = tmp_path / "sft"
    recipe = load_recipe("recipes/tiny/sft.yaml", "sft", [SMALL, f"training.output_dir={out}"])
    load_base_model(recipe.model).save_pretrained(out)
    save_tokenizer(load_tokenizer(), out)
    save_resolved_recipe(recipe, out / "recipe.yaml")
    return out


def test_tiny_sft_recipe_passes(capsys):
    code, checks = run(capsys, "recipes/tiny/sft.yaml", SMALL, *FEW_ROWS)
    assert code == 0
    for name in (
        "recipe",
        "model",
        "sliding window",
        "data",
        "chat template",
        "adapters",
        "4-bit",
        "router losses",
    ):
        assert checks[name] == "PASS", name
    assert checks["zero3 leaves"] == "SKIP"  # not a ZeRO-3 launch


def test_tiny_dpo_recipe_with_expert_lora_passes(capsys, sft_output):
    args = [f"model.name_or_path={sft_output}", "lora.targets=[q_proj,w1]", "router.policy=lora", *FEW_ROWS]
    code, checks = run(capsys, "recipes/tiny/dpo.yaml", *args)
    assert code == 0, checks
    assert checks["adapters"] == checks["router losses"] == checks["sliding window"] == "PASS"


def test_what_would_break_a_run_fails(capsys, sft_output, tmp_path):
    # A checkpoint whose window is not the one its recipe made, and a data file with a bad row.
    config = json.loads((sft_output / "config.json").read_text())
    config["sliding_window"] = 16
    (sft_output / "config.json").write_text(json.dumps(config))
    bad = tmp_path / "pairs.jsonl"
    good = (REPO / "data/tasks/pref_train.jsonl").read_text().splitlines()[:8]
    bad.write_text("\n".join([*good[:4], '{"prompt": "no answers here"}', *good[4:]]) + "\n")
    args = [
        f"model.name_or_path={sft_output}",
        f"data.train.0.path={bad}",
        "data.eval=[]",
        "training.eval_strategy=no",
    ]
    code, checks = run(capsys, "recipes/tiny/dpo.yaml", *args)
    assert code == 1
    assert checks["sliding window"] == "FAIL" and checks["data"] == "FAIL"
    assert checks["router losses"] == "PASS"  # the other checks still ran on the good rows


def test_invalid_recipe_fails_and_stops(capsys):
    code, checks = run(capsys, "recipes/tiny/sft.yaml", "lora.targets=[gate]")
    assert code == 1 and checks == {"recipe": "FAIL", "everything": "SKIP"}


def test_model_too_big_here_is_checked_on_a_stand_in(capsys, tmp_path):
    real = tmp_path / "mixtral-8x7b"
    MixtralConfig.preset("mixtral-8x7b").save_pretrained(real)  # the config only: 46.7B parameters
    data = [
        "data.train=[{path: data/tasks/sft_train.jsonl, limit: 16}]",
        "data.eval=[]",
        "training.eval_strategy=no",
    ]
    args = [f"model.name_or_path={real}", "training.bf16=false", *data]
    code, checks = run(capsys, "recipes/mixtral-8x7b/sft/qlora_1gpu.yaml", *args)
    assert code == 0, checks
    assert checks["build"] == "SKIP" and checks["router losses"] == "SKIP"
    assert checks["adapters"] == checks["4-bit"] == checks["model"] == "PASS"


def test_adapters_that_miss_the_experts_fail():
    recipe = load_recipe("recipes/tiny/dpo.yaml", "dpo", ["model.name_or_path=preset:tiny", SMALL])
    model = build_model(
        load_recipe(
            "recipes/tiny/dpo.yaml", "dpo", ["model.name_or_path=preset:tiny", SMALL, "lora.targets=[q_proj]"]
        )
    )
    report = Report(io.StringIO())
    check_adapters(report, recipe, BuiltModel(model, stand_in=False))
    ((status, _, message),) = report.lines
    assert status == "FAIL" and "w1: LoRA missing but lora.targets lists it" in message
