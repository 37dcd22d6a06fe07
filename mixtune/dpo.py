"""Preference optimisation: `accelerate launch -m mixtune.dpo RECIPE.yaml [key=value ...]`.

Starts from an SFT output: a full model directory (model.name_or_path), or a base model plus the
SFT adapter (lora.init_from). The reference model is that SFT model: with LoRA it is the same
weights with the new adapter disabled, or a frozen copy of the continued adapter, so no second
full model is held.
"""

from __future__ import annotations

import sys

from mixtune.data import build_preference_datasets
from mixtune.recipe import recipe_from_argv
from mixtune.train.dpo_trainer import MixtuneDPOTrainer
from mixtune.train.setup import build_run, build_trainer, summary, train_and_save


def reference_description(recipe) -> str:
    """How the trainer gets the reference log-probs, in words for the start-up summary."""
    if recipe.training.precompute_ref_log_probs:
        how = "precomputed once before training"
    elif not recipe.lora.enabled:
        how = "a frozen full copy of the starting model"
    elif recipe.lora.init_from:
        how = f"a frozen copy of the adapter {recipe.lora.init_from}, which the policy continues"
    else:
        # TRL copies the new (zero-initialised) adapter into a frozen "ref" adapter: the base
        # weights are shared, so only the adapter is held twice.
        how = "the starting weights plus a frozen copy of the fresh adapter (equal to no adapter)"
    return f"the SFT model: {how}"


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_from_argv("dpo", argv)
    run = build_run(recipe, build_preference_datasets)
    trainer = build_trainer(MixtuneDPOTrainer, run)
    training = recipe.training
    extra = {
        "dpo": f"loss {', '.join(training.loss_type)}, beta {training.beta}, "
        f"label smoothing {training.label_smoothing}",
        "reference": reference_description(recipe),
    }
    return train_and_save(trainer, run, summary(run, extra))


if __name__ == "__main__":
    sys.exit(main())
