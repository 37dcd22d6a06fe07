"""Supervised fine-tuning: `accelerate launch -m mixtune.sft RECIPE.yaml [key=value ...]`.

Also runs as `python -m mixtune.sft ...` on one process. See README for recipes and overrides.
"""

from __future__ import annotations

import sys

from mixtune.data import build_sft_datasets
from mixtune.recipe import recipe_from_argv
from mixtune.train.setup import build_run, build_trainer, summary, train_and_save
from mixtune.train.sft_trainer import MixtuneSFTTrainer


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_from_argv("sft", argv)
    run = build_run(recipe, build_sft_datasets)
    trainer = build_trainer(MixtuneSFTTrainer, run)
    return train_and_save(trainer, run, summary(run))


if __name__ == "__main__":
    sys.exit(main())
