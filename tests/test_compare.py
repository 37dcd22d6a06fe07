"""mixtune.compare on real offline W&B runs of the tiny SFT and DPO recipes, and the W&B API path."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import yaml

from mixtune import compare, dpo, sft
from mixtune.compare_runs import read_offline, read_online
from mixtune.compare_runs.offline import find_run_dir
from mixtune.compare_runs.run import STEP
from tests.conftest import REPO

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An SFT run and a DPO run from it, both with W&B offline; and a run directory without W&B."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        common = ["training.logging_steps=1", "training.save_strategy=no", "logging.wandb=true"]
        sft_out = root / "sft"
        sft_args = [f"training.output_dir={sft_out}", SMALL, "training.max_steps=4", "training.eval_steps=4"]
        sft_data = ["data.train.0.limit=64", "data.eval.0.limit=16"]
        assert sft.main(["recipes/tiny/sft.yaml", *sft_args, *sft_data, *common]) == 0
        dpo_out = root / "dpo"
        dpo_args = [f"model.name_or_path={sft_out}", f"training.output_dir={dpo_out}", "training.max_steps=3"]
        dpo_data = ["data.train.0.limit=24", "data.eval.0.limit=8", "training.eval_steps=3"]
        batches = ["training.per_device_train_batch_size=8", "training.per_device_eval_batch_size=8"]
        assert dpo.main(["recipes/tiny/dpo.yaml", *dpo_args, *dpo_data, *batches, *common]) == 0
    finally:
        os.chdir(cwd)
    # A run logged without W&B: metrics.jsonl and recipe.yaml only, another learning rate.
    plain = root / "plain"
    plain.mkdir()
    shutil.copy(sft_out / "metrics.jsonl", plain)
    recipe = yaml.safe_load((sft_out / "recipe.yaml").read_text())
    recipe["training"]["learning_rate"] = 0.01
    (plain / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return SimpleNamespace(sft=sft_out, dpo=dpo_out, plain=plain)


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_offline_run_is_read_from_the_wandb_file(runs):
    run = read_offline(runs.sft)
    assert run.reader == "wandb leet inspect" and run.label == "sft"
    assert run.config["stage"] == "sft" and run.config["training.learning_rate"] == 0.002
    # The same numbers the trainer wrote to metrics.jsonl, under W&B's names.
    losses = [row["loss"] for row in jsonl(runs.sft / "metrics.jsonl") if "loss" in row]
    assert run.series("train/loss")[1] == pytest.approx(losses)
    assert run.series("train/loss")[0] == [1.0, 2.0, 3.0, 4.0]
    shares = run.final_shares()
    assert len(shares) == 2 and len(shares[0]) == 8 and sum(shares[1]) == pytest.approx(1.0)


@pytest.mark.slow
def test_new_router_metrics_are_logged(runs):
    rows = [r for r in jsonl(runs.sft / "metrics.jsonl") if "router/drift_tv" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["router/drift_tv"] == 0.0  # logging_steps=1: the first window is the reference
    for row in rows:
        over = [row[f"router/layer1/overflow_cf{f}"] for f in ("1_00", "1_25", "2_00")]
        assert 1 >= over[0] >= over[1] >= over[2] >= 0
        assert row["router/collapsed_experts"] >= 0 and "router/layer0/drift_kl" in row


@pytest.mark.slow
def test_compare_prints_differences_and_writes_plots(runs, tmp_path, capsys):
    dpo_dir = find_run_dir(runs.dpo)  # an offline-run-* directory itself also works
    out = tmp_path / "cmp"
    assert compare.main([str(runs.sft), str(dpo_dir), str(runs.plain), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "reading metrics.jsonl instead" in printed.err
    for text in (
        "training.learning_rate",
        "0.002",
        "0.01",
        "train/rewards/margins",
        "train/router/balance_loss",
    ):
        assert text in printed.out, text
    summary = json.loads((out / "summary.json").read_text())
    assert [r["reader"] for r in summary["runs"]] == [
        "wandb leet inspect",
        "wandb leet inspect",
        "metrics.jsonl",
    ]
    assert summary["config_differences"]["training.learning_rate"] == [0.002, 0.001, 0.01]
    assert summary["metrics"]["train/rewards/accuracies"]["sft"] is None
    assert summary["metrics"]["eval/rewards/margins"]["dpo"]["final"] is not None
    loss = summary["metrics"]["train/loss"]["sft"]
    assert loss["best"] <= loss["final"]
    for name in (
        "loss.png",
        "dpo_margins.png",
        "router.png",
        "expert_load_sft.png",
        "expert_load_dpo.png",
        "expert_load_plain.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.slow
def test_metrics_selection_by_glob(runs, tmp_path, capsys):
    assert (
        compare.main(
            [
                str(runs.sft),
                "--metrics",
                "loss,router/layer0/expert*_share",
                "--no-plots",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["metrics"])[:2] == ["train/loss", "train/router/layer0/expert0_share"]
    assert len(summary["metrics"]) == 1 + 8


def test_unreadable_run_is_a_clear_error(tmp_path, capsys):
    assert compare.main([str(tmp_path), "--no-plots", "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


class FakeApi:
    """Stands in for wandb.Api (no network here): the calls mixtune makes, recorded."""

    def __init__(self):
        self.calls = []
        self.run_obj = SimpleNamespace(
            name="sft-a",
            id="abc123",
            path=["ent", "proj", "abc123"],
            config={"recipe": {"stage": "sft", "training": {"learning_rate": 1e-4}}, "stage": "sft"},
            scan_history=lambda: [{STEP: 1, "train/loss": 2.0, "_timestamp": 1.0, "media": {"x": 1}}],
        )

    def run(self, path):
        self.calls.append(("run", path))
        return self.run_obj

    def runs(self, path, filters=None):
        self.calls.append(("runs", path, filters))
        return [self.run_obj]


def test_online_runs_go_through_the_wandb_api():
    api = FakeApi()
    (one,) = read_online("ent/proj/abc123", api=api)
    assert one.source == "ent/proj/abc123" and one.reader == "wandb api"
    assert one.config == {"stage": "sft", "training.learning_rate": 1e-4}
    assert one.history == [{STEP: 1.0, "train/loss": 2.0, "_timestamp": 1.0}]
    read_online("ent/proj", group="tiny", tags=["sft"], api=api)
    assert api.calls[-1] == ("runs", "ent/proj", {"group": "tiny", "tags": {"$in": ["sft"]}})
