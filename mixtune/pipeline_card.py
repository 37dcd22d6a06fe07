"""The model card of a pipeline's export: base model, data, recipes and final metrics of each stage."""

from __future__ import annotations

import json
from pathlib import Path

from mixtune.model_card import render_card, write_card
from mixtune.train.model_loading import stage_model_section

# Final values worth a line in the card, in this order, when a stage logged them.
CARD_METRICS = (
    "train_loss",
    "eval_loss",
    "eval_mean_token_accuracy",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "router/balance_loss",
    "router/z_loss",
    "router/max_over_mean",
)


def final_metrics(stage_dir: Path, metrics_file: str = "metrics.jsonl") -> dict[str, float]:
    """Last logged value of each card metric in a stage's metrics file."""
    path = stage_dir / metrics_file
    last: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            last.update({k: v for k, v in json.loads(line).items() if isinstance(v, int | float)})
    return {k: last[k] for k in CARD_METRICS if k in last}


def _stage(stage: str, stage_dir: Path, recipe: str) -> dict:
    report = stage_dir / "data_report.txt"
    return {
        "stage": stage,
        "recipe": recipe,
        "data": report.read_text() if report.exists() else "(no data report)",
        "metrics": final_metrics(stage_dir),
    }


def base_model_of(sft_dir: Path) -> str:
    return stage_model_section(sft_dir).name_or_path


def write_pipeline_card(spec, sft_dir: Path, dpo_dir: Path, report) -> Path:
    text = render_card(
        name=Path(spec.export_dir).name,
        base_model=base_model_of(sft_dir),
        stages=[_stage("sft", sft_dir, spec.sft), _stage("dpo", dpo_dir, spec.dpo)],
        checks=report.checks,
    )
    return write_card(Path(spec.export_dir) / "README.md", text)
