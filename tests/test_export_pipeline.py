"""Merge and export are checked; the pipeline runs SFT -> DPO -> export in one command."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MixtralForCausalLM as HFMixtral

from mixtune import sft
from mixtune.export import ExportError, export_model
from mixtune.lora.expert_lora import ExpertProjectionLora
from mixtune.model import MixtralForCausalLM
from mixtune.pipeline import read_spec, run_pipeline
from tests.conftest import REPO

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def lora_stage(tmp_path):
    """A real SFT output with a trained LoRA adapter on attention, experts and the router."""
    out = tmp_path / "sft"
    args = [
        "recipes/tiny/sft.yaml",
        f"training.output_dir={out}",
        SMALL,
        "training.max_steps=4",
        "training.learning_rate=1e-2",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "lora.enabled=true",
        "router.policy=lora",
        "logging.wandb=false",
    ]
    assert sft.main(args) == 0
    return out


@pytest.mark.slow
def test_export_merges_and_transformers_loads_the_same_model(tmp_path, lora_stage):
    report = export_model(lora_stage, tmp_path / "export", verify="full")
    assert report.merged_adapter
    checks = json.loads((tmp_path / "export" / "export_checks.json").read_text())
    assert set(checks) >= {"merged == adapter (mixtune)", "exported, loaded by transformers"}
    # Classic layout on disk, and transformers' own class reads it.
    index = (tmp_path / "export" / "model.safetensors").exists() or (
        tmp_path / "export" / "model.safetensors.index.json"
    ).exists()
    assert index
    hf = HFMixtral.from_pretrained(tmp_path / "export")
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.tensor([[1, 733, 16289, 28793, 22211, 28705, 28774, 28705, 28750]])
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_merge_that_drops_expert_deltas_is_caught(tmp_path, lora_stage, monkeypatch):
    # The failure other tools shipped: expert LoRA silently lost at merge time.
    monkeypatch.setattr(ExpertProjectionLora, "merge", lambda self, *a, **k: None)
    with pytest.raises(ExportError, match="merged == adapter"):
        export_model(lora_stage, tmp_path / "export", verify="mixtune")


@pytest.mark.slow
def test_pipeline_runs_sft_then_dpo_then_exports(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = read_spec(
        "recipes/tiny/pipeline.yaml",
        [
            f"export_dir={tmp_path / 'instruct'}",
            f"sft_overrides=[training.output_dir={tmp_path / 'sft'}, '{SMALL}', training.max_steps=4, "
            "training.eval_strategy=no, training.save_strategy=no]",
            f"dpo_overrides=[training.output_dir={tmp_path / 'dpo'}, training.max_steps=3, "
            "training.eval_strategy=no, training.save_strategy=no]",
        ],
    )
    result = run_pipeline(spec)
    assert result.export_dir == tmp_path / "instruct"
    card = (tmp_path / "instruct" / "README.md").read_text()
    assert "SFT" in card and "DPO" in card and "preset:tiny" in card
    assert HFMixtral.from_pretrained(tmp_path / "instruct").config.num_hidden_layers == 2
    # Both stages logged offline W&B runs in the same group.
    for stage in ("sft", "dpo"):
        runs = list((tmp_path / stage / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, stage
