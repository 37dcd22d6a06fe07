"""The README.md model card written next to an exported model: what it is, from what, how well.

Built only from the resolved recipes (already secret-redacted), data counts and final metrics, and
checked once more for anything token-shaped before it is written.
"""

from __future__ import annotations

from pathlib import Path

from mixtune.recipe.secrets import redact


def _metric_lines(metrics: dict[str, float]) -> list[str]:
    return [f"| {key} | {value:.4g} |" for key, value in metrics.items()]


def render_card(
    name: str,
    base_model: str,
    stages: list[dict],
    checks: dict,
) -> str:
    """Markdown card. `stages`: dicts with stage, recipe (path), data (summary text), metrics (dict)."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [mixtral, moe, mixtune, sft, dpo]",
        "---",
        "",
        f"# {name}",
        "",
        f"A Mixtral-architecture mixture-of-experts model fine-tuned with mixtune from `{base_model}`: "
        + " then ".join(s["stage"].upper() for s in stages)
        + ", adapters merged into the weights.",
        "",
        "Weights are in the classic Mixtral layout (`block_sparse_moe.experts.N.w1/w2/w3`), sharded "
        "safetensors; `transformers.MixtralForCausalLM.from_pretrained` loads them as is. The tokenizer "
        "is Mixtral's v1 SentencePiece vocabulary with the `[INST] ... [/INST]` chat format "
        "(`AutoTokenizer` + `apply_chat_template`).",
        "",
    ]
    for stage in stages:
        lines += [
            f"## {stage['stage'].upper()}",
            "",
            f"Recipe: `{stage['recipe']}`",
            "",
            "```",
            stage["data"].strip(),
            "```",
            "",
        ]
        if stage["metrics"]:
            lines += ["| final metric | value |", "|---|---|", *_metric_lines(stage["metrics"]), ""]
    lines += ["## Export checks", "", "| check | result |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in checks.items()]
    return "\n".join(lines) + "\n"


def write_card(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.write_text(redact(text))
    return path
