"""SFT, then DPO, then a checked export of the merged Instruct model, in one command.

    python -m mixtune.pipeline recipes/tiny/pipeline.yaml [key=value ...]

A pipeline file names the two stage recipes and the export:

    sft: recipes/tiny/sft.yaml
    dpo: recipes/tiny/dpo.yaml
    export_dir: runs/tiny/instruct
    accelerate_config: configs/zero3.yaml   # optional: launch each stage with accelerate
    num_processes: 8                        # optional
    sft_overrides: [training.max_steps=100] # optional, in the recipe override syntax

Each stage runs as its own launch (`accelerate launch -m mixtune.sft ...`, or `python -m` without an
accelerate config), exactly as a user would run it by hand, so distributed state never leaks from
one stage into the next. DPO starts from the SFT output: a full model directory as its base, or
the SFT adapter continued on the same base (its frozen copy is the reference). Both stages log to
one W&B group (`name`, by default the export directory's name).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixtune.recipe import RecipeError, load_recipe
from mixtune.recipe.loader import _Where, build_dataclass, read_recipe_file
from mixtune.recipe.overrides import apply_overrides, split_argv


@dataclass
class PipelineSpec:
    sft: str
    dpo: str
    export_dir: str
    name: str | None = None
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    verify: Literal["full", "mixtune", "none"] = "full"
    accelerate_config: str | None = None
    num_processes: int | None = None
    sft_overrides: list[str] = field(default_factory=list)
    dpo_overrides: list[str] = field(default_factory=list)

    @property
    def group(self) -> str:
        return self.name or Path(self.export_dir).name


@dataclass
class PipelineResult:
    sft_dir: Path
    dpo_dir: Path
    export_dir: Path
    checks: dict[str, str]


def read_spec(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    raw = read_recipe_file(path)
    apply_overrides(raw, overrides, str(path))
    return build_dataclass(PipelineSpec, raw, "pipeline", _Where(raw, str(path)))


def launch_command(spec: PipelineSpec, stage: str, recipe: str, overrides: list[str]) -> list[str]:
    if spec.accelerate_config is None:
        launcher = [sys.executable, "-m"]
    else:
        # accelerate's launcher as a module of this interpreter: works without the venv on PATH.
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            spec.accelerate_config,
        ]
        if spec.num_processes is not None:
            launcher += ["--num_processes", str(spec.num_processes)]
        launcher.append("-m")
    return [*launcher, f"mixtune.{stage}", recipe, *overrides]


def run_stage(spec: PipelineSpec, stage: str, recipe: str, overrides: list[str]) -> None:
    command = launch_command(spec, stage, recipe, overrides)
    print(f"\n=== mixtune pipeline: {stage.upper()} ===\n$ {' '.join(command)}", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"mixtune pipeline: the {stage.upper()} stage failed (exit {result.returncode}); stopping"
        )


def dpo_start(sft_recipe, sft_dir: Path) -> list[str]:
    """Overrides that point the DPO recipe at the SFT result."""
    if (sft_dir / "adapter_config.json").exists():
        model = sft_recipe.model
        start = [f"model.name_or_path={model.name_or_path}", f"model.init_seed={model.init_seed}"]
        start += [f"model.config_overrides.{k}={v}" for k, v in model.config_overrides.items()]
        return [*start, f"lora.init_from={sft_dir}", "lora.enabled=true"]
    return [f"model.name_or_path={sft_dir}"]


def run_pipeline(spec: PipelineSpec) -> PipelineResult:
    from mixtune.export import export_model

    group = [f"logging.group={spec.group}", f"logging.tags=[pipeline,{spec.group}]"]
    sft_overrides = [*spec.sft_overrides, *group]
    sft_recipe = load_recipe(spec.sft, "sft", sft_overrides)
    sft_dir = Path(sft_recipe.training.output_dir)
    run_stage(spec, "sft", spec.sft, sft_overrides)

    dpo_overrides = [*dpo_start(sft_recipe, sft_dir), *spec.dpo_overrides, *group]
    dpo_recipe = load_recipe(spec.dpo, "dpo", dpo_overrides)
    dpo_dir = Path(dpo_recipe.training.output_dir)
    run_stage(spec, "dpo", spec.dpo, dpo_overrides)

    print(f"\n=== mixtune pipeline: EXPORT ===\nmerging {dpo_dir} into {spec.export_dir}", flush=True)
    dtype = spec.export_dtype or dpo_recipe.model.dtype
    report = export_model(dpo_dir, spec.export_dir, dtype=dtype, verify=spec.verify)
    from mixtune.pipeline_card import write_pipeline_card

    write_pipeline_card(spec, sft_dir, dpo_dir, report)
    for check, result in report.checks.items():
        print(f"  {check}: {result}", flush=True)
    print(f"Instruct model: {report.directory}", flush=True)
    return PipelineResult(sft_dir, dpo_dir, report.directory, report.checks)


def main(argv: list[str] | None = None) -> int:
    try:
        path, overrides = split_argv(sys.argv[1:] if argv is None else argv)
        spec = read_spec(path, overrides)
    except RecipeError as e:
        print(f"mixtune.pipeline: {e}", file=sys.stderr)
        return 2
    run_pipeline(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
