"""What a recipe holds: one dataclass per YAML section, keys are field names.

`training` is not declared here: it is TRL's own `SFTConfig` or `DPOConfig`, so every trainer option
is reachable without mirroring it. Bounds that the loader checks ride on field metadata (`ge`, `gt`,
`lt`, `le`, `nonempty`) so that each constraint sits next to the field it constrains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # importing TRL takes seconds; only the loader pays for it, when it needs it
    from trl import DPOConfig, SFTConfig

Stage = Literal["sft", "dpo"]

# Each expert's gate (w1), down (w2) and up (w3) projections, and attention. The router is missing on
# purpose: it is trained only through `router.policy`, never as a side effect of a target list.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")

# Data files by suffix; anything else (without ./ ../ / ~) is taken as a Hugging Face dataset id.
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class RecipeError(ValueError):
    """A recipe that cannot run. The message starts with the file (and line, when known)."""


@dataclass
class ModelSection:
    """The base model: a local directory in Mixtral layout, or `preset:<name>` (random init)."""

    name_or_path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: str | None = None
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0

    @property
    def preset(self) -> str | None:
        """The preset name for `preset:<name>`, else None."""
        prefix = "preset:"
        return self.name_or_path[len(prefix) :] if self.name_or_path.startswith(prefix) else None


@dataclass
class DataSource:
    """One dataset of a mixture: a local file or a hub dataset id."""

    path: str
    format: Literal["auto", "messages", "alpaca", "sharegpt", "preference", "hh"] = "auto"
    weight: float = field(default=1.0, metadata={"gt": 0})
    split: str = "train"
    subset: str | None = None
    limit: int | None = field(default=None, metadata={"ge": 1})


@dataclass
class DataSection:
    """Training and evaluation data and how rows become model inputs."""

    train: list[DataSource] = field(metadata={"nonempty": True})
    eval: list[DataSource] = field(default_factory=list)
    eval_fraction: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    max_length: int = field(default=1024, metadata={"ge": 1})
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    max_skip_fraction: float = field(default=0.01, metadata={"ge": 0, "le": 1})
    packing: bool = False
    seed: int = 42


@dataclass
class LoraSection:
    """Low-rank adapters on attention and expert projections."""

    enabled: bool = True
    r: int = field(default=16, metadata={"ge": 1})
    alpha: float = field(default=32, metadata={"gt": 0})
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init_from: str | None = None


@dataclass
class RouterSection:
    """How the router trains and which auxiliary losses it gets."""

    policy: Literal["frozen", "lora", "full"] = "frozen"
    balance_coef: float | None = field(default=None, metadata={"ge": 0})  # None: the model config's
    z_loss_coef: float = field(default=0.001, metadata={"ge": 0})
    balance_scope: Literal["global", "sequence"] = "global"
    # Warn when an expert's share stays under collapse_share x the mean share for collapse_patience
    # logging steps in a row (see mixtune/train/routing_drift.py).
    collapse_share: float = field(default=0.25, metadata={"gt": 0})
    collapse_patience: int = field(default=3, metadata={"ge": 1})


@dataclass
class LoggingSection:
    """Run tracking: W&B (optional) and the local metrics file."""

    wandb: bool = False
    project: str = "mixtune"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None
    metrics_file: str = "metrics.jsonl"


@dataclass
class ReliabilitySection:
    """What a run does about faults (docs/reliability.md).

    on_nonfinite: a step whose loss or gradient is NaN or Inf never reaches the optimizer; `stop`
        ends the run naming the step and its samples, `skip` drops the step's update and counts it
        (not available under DeepSpeed, whose engine steps inside backward).
    max_nonfinite_skips: with `skip`, the run stops once more steps than this were skipped.
    allow_recipe_changes: dotted keys (`data.train`, `lora`) that a resume may change although the
        change alters what the checkpoint means; without them such a resume is refused.
    """

    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = field(default=10, metadata={"ge": 0})
    allow_recipe_changes: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A loaded, validated recipe for one stage.

    `stage` may also be written in the YAML (`stage: dpo`) as a guard against launching a recipe
    with the wrong entry point; `source` is the file it came from and is not a YAML key.
    """

    stage: Stage
    model: ModelSection
    data: DataSection
    training: SFTConfig | DPOConfig
    lora: LoraSection = field(default_factory=LoraSection)
    router: RouterSection = field(default_factory=RouterSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    reliability: ReliabilitySection = field(default_factory=ReliabilitySection)
    source: Path | None = None


# Top-level YAML keys and the dataclass each one fills; "training" is the stage's TRL config.
SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "lora": LoraSection,
    "router": RouterSection,
    "logging": LoggingSection,
    "reliability": ReliabilitySection,
}
TOP_LEVEL_KEYS = ("stage", "model", "data", "training", "lora", "router", "logging", "reliability")
