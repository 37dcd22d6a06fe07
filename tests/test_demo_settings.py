"""The demo's stage settings are valid recipes: `make demo` is not in CI (7 minutes), so a renamed
key or a bad value in its overrides would otherwise first show on a user's machine."""

from __future__ import annotations

import pytest

from mixtune import demo
from mixtune.recipe import load_recipe
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_demo_overrides_load_on_the_tiny_recipes():
    sft = load_recipe("recipes/tiny/sft.yaml", "sft", demo.SFT_OVERRIDES)
    # The pipeline points DPO at the SFT output; a preset stands in for it here.
    dpo = load_recipe("recipes/tiny/dpo.yaml", "dpo", [*demo.DPO_OVERRIDES, "model.name_or_path=preset:tiny"])
    # The warmup is what made the demo's result independent of the data order (docs/demo.md).
    assert sft.training.warmup_steps == 100 and sft.training.max_steps == 1500
    assert sft.training.output_dir.startswith(str(demo.ROOT)) and dpo.training.output_dir.startswith(
        str(demo.ROOT)
    )
