"""Supervised fine-tuning: `accelerate launch -m mixtune.sft RECIPE.yaml [key=value ...]`.

Also runs as `python -m mixtune.sft ...` on one process. See README for recipes and overrides.
"""

from __future__ import annotations

import sys

from mixtune.data import build_sft_datasets
from mixtune.recipe import recipe_from_argv
from mixtune.train.setup import (
    build_run,
    router_loss_config,
    router_watch_config,
    save_outputs,
    shutdown,
    summary,
    train,
    use_compact_console,
)
from mixtune.train.sft_trainer import MixtuneSFTTrainer


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_from_argv("sft", argv)
    run = build_run(recipe, build_sft_datasets)
    trainer = MixtuneSFTTrainer(
        model=run.model,
        args=recipe.training,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
        callbacks=run.callbacks,
        router_cfg=router_loss_config(recipe, run.model),
        router_watch=router_watch_config(recipe),
        top_k=run.model.config.num_experts_per_tok,
        recipe=recipe,
    )
    use_compact_console(trainer)
    if trainer.accelerator.is_main_process:
        print(summary(run), flush=True)
    code = train(trainer, recipe)
    if code == 0:
        output_dir = save_outputs(trainer, run)
        if trainer.accelerator.is_main_process:
            print(f"saved to {output_dir}", flush=True)
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
