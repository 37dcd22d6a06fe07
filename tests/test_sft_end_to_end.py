"""The real SFT entry point on the tiny recipe: loss goes down, weights change, outputs are complete."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mixtune import sft
from mixtune.lora import load_adapter
from mixtune.model import MixtralForCausalLM
from mixtune.recipe import load_recipe
from mixtune.train.model_loading import load_base_model
from tests.conftest import REPO

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"
FAST = [
    SMALL,
    "training.logging_steps=2",
    "training.eval_steps=6",
    "training.save_steps=6",
    "logging.wandb=false",
]


def run_sft(tmp_path, *overrides: str):
    out = tmp_path / "sft"
    args = ["recipes/tiny/sft.yaml", f"training.output_dir={out}", *FAST, *overrides]
    assert sft.main(args) == 0
    return out


def logged(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.slow
def test_lora_sft_learns_and_saves_a_changed_adapter(tmp_path):
    out = run_sft(tmp_path, "training.max_steps=12", "lora.enabled=true", "router.policy=lora", "lora.r=8")
    losses = logged(out, "loss")
    assert losses[-1] < losses[0], losses
    # Router metrics are logged per layer, every logging step.
    assert len(logged(out, "router/layer1/expert7_share")) == len(losses)
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: every adapter moved
    assert any(".experts.w2_proj." in k for k in adapter) and any(".router.proj.lora_A" in k for k in adapter)
    for name in (
        "tokenizer_config.json",
        "tokenizer.model.v1",
        "recipe.yaml",
        "data_report.txt",
        "adapter_config.json",
    ):
        assert (out / name).exists(), name
    # The resolved recipe rebuilds the same seeded base, and the adapter loads onto it.
    recipe = load_recipe(out / "recipe.yaml", "sft", [f"training.output_dir={tmp_path / 'x'}"])
    ids = torch.tensor([[1, 733, 16289, 28793, 28705]])
    base_logits = load_base_model(recipe.model)(ids).logits
    tuned = load_adapter(load_base_model(recipe.model), out)
    assert (tuned(ids).logits - base_logits).abs().max() > 1e-4


@pytest.mark.slow
def test_full_sft_learns_and_resumes_from_checkpoint(tmp_path):
    out = run_sft(tmp_path, "training.max_steps=12")
    losses = logged(out, "loss")
    assert losses[-1] < losses[0], losses
    model = MixtralForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    resumed = run_sft(
        tmp_path, "training.max_steps=12", f"training.resume_from_checkpoint={out / 'checkpoint-6'}"
    )
    assert resumed == out
