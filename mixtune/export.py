"""Merge a stage's adapter into its base and export the result as a Hugging Face checkpoint, checked.

`python -m mixtune.export STAGE_OUTPUT_DIR EXPORT_DIR [--dtype bfloat16] [--verify full|mixtune|none]`

The export is classic-layout sharded safetensors with config.json, the tokenizer (with its chat
format) and a model card. It is verified before the command succeeds:
- merged logits equal the adapter model's logits (the merge lost nothing: no expert delta dropped);
- transformers' own MixtralForCausalLM loads the directory and gives the same logits;
- AutoTokenizer on the directory gives the Mixtral v1 ids for a chat.
A base trained in 4 bits (QLoRA) is reloaded in full precision for the merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixtune.chat_format import encode_prompt
from mixtune.lora import load_adapter
from mixtune.model import MixtralForCausalLM
from mixtune.tokenizer import load_tokenizer, save_tokenizer
from mixtune.train.model_loading import DTYPES, load_base_model, stage_model_section, tokenizer_source

PROBE_CHATS = [
    [{"role": "user", "content": "Sort in increasing order: 9 5 2"}],
    [{"role": "user", "content": "Which number is bigger: 59 or 98?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another one?"},
    ],
]
# Largest logit difference accepted between two computations of the same weights.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class ExportError(RuntimeError):
    """An export that failed one of its checks; nothing is left looking like a good model."""


@dataclass
class ExportReport:
    directory: Path
    merged_adapter: bool
    checks: dict[str, str] = field(default_factory=dict)


def _probe_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [encode_prompt(tokenizer, chat) for chat in PROBE_CHATS]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits.float()[mask.bool()]


def _compare(name: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, checks: dict) -> None:
    diff = (a - b).abs().max().item()
    tol = TOLERANCE[dtype]
    checks[name] = f"max |diff| {diff:.2e} (tolerance {tol:.0e})"
    if not diff <= tol:
        raise ExportError(f"export check failed: {name}: max |logit diff| {diff:.3e} > {tol:.0e}")


def load_stage_model(stage_dir: Path, dtype: torch.dtype):
    """(model, has_adapter): a full-weights stage output, or its base (full precision) plus the adapter."""
    if (stage_dir / "adapter_config.json").exists():
        section = stage_model_section(stage_dir)
        section.load_in_4bit = False  # merge into full-precision weights, never into NF4
        section.dtype = {v: k for k, v in DTYPES.items()}[dtype]
        return load_adapter(load_base_model(section), stage_dir).eval(), True
    return MixtralForCausalLM.from_pretrained(stage_dir, dtype=dtype).eval(), False


def export_model(
    stage_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    verify: str = "full",
    max_shard_size="5GB",
) -> ExportReport:
    """Merge (if there is an adapter), write, reload and compare. Raises ExportError on any mismatch."""
    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    torch_dtype = DTYPES[dtype]
    has_tokenizer = (stage_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(
        str(stage_dir) if has_tokenizer else tokenizer_source(stage_model_section(stage_dir))
    )
    model, has_adapter = load_stage_model(stage_dir, torch_dtype)
    ids, mask = _probe_batch(tokenizer)
    report = ExportReport(out_dir, has_adapter)
    reference = _logits(model, ids, mask) if verify != "none" else None
    if has_adapter:
        model = model.merge_and_unload()
        if reference is not None:
            _compare(
                "merged == adapter (mixtune)",
                _logits(model, ids, mask),
                reference,
                torch_dtype,
                report.checks,
            )
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    save_tokenizer(tokenizer, out_dir)
    del model
    if verify == "none":
        return report
    reloaded = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch_dtype).eval()
    _compare(
        "exported, reloaded by mixtune", _logits(reloaded, ids, mask), reference, torch_dtype, report.checks
    )
    del reloaded
    if verify == "full":
        from transformers import AutoTokenizer
        from transformers import MixtralForCausalLM as HFMixtral

        hf = HFMixtral.from_pretrained(out_dir, dtype=torch_dtype).eval()
        _compare(
            "exported, loaded by transformers", _logits(hf, ids, mask), reference, torch_dtype, report.checks
        )
        del hf
        auto = AutoTokenizer.from_pretrained(out_dir)
        ids_auto = auto.apply_chat_template(PROBE_CHATS[2], tokenize=True)
        ids_auto = ids_auto["input_ids"] if hasattr(ids_auto, "keys") else ids_auto  # BatchEncoding or list
        same = list(ids_auto) == encode_prompt(tokenizer, PROBE_CHATS[2])
        report.checks["AutoTokenizer chat template == Mixtral v1 ids"] = "yes" if same else "NO"
        if not same:
            raise ExportError(
                "export check failed: AutoTokenizer's chat template does not give the Mixtral v1 ids"
            )
    (out_dir / "export_checks.json").write_text(json.dumps(report.checks, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixtune.export", description=__doc__.splitlines()[0])
    parser.add_argument("stage_dir", help="output directory of an SFT or DPO run (adapter or full weights)")
    parser.add_argument("out_dir", help="where the merged Hugging Face checkpoint goes")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--verify", default="full", choices=["full", "mixtune", "none"])
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        report = export_model(args.stage_dir, args.out_dir, args.dtype, args.verify, args.max_shard_size)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported to {report.directory}")
    for check, result in report.checks.items():
        print(f"  {check}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
