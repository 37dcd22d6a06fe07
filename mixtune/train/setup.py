"""What SFT and DPO share: recipe -> tokenizer, model with adapters, datasets, callbacks, summary.

The entry points (mixtune.sft, mixtune.dpo) stay short and linear; everything they have in
common lives here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import parse_flag_from_env
from transformers import set_seed

from mixtune.distributed import register_moe_leaves, zero3_enabled, zero3_summary
from mixtune.lora import apply_lora, load_adapter, make_lora_config, set_router_trainable
from mixtune.model.weights import CheckpointError
from mixtune.recipe import RecipeError, save_resolved_recipe
from mixtune.tokenizer import load_tokenizer, save_tokenizer

from .callbacks import ConsoleProgressCallback, MetricsFileCallback
from .model_loading import load_base_model, tokenizer_source
from .nonfinite import NonFiniteError, refuse_unsupported
from .objective import RouterLossConfig
from .routing_drift import WatchConfig
from .signals import PREEMPTED_EXIT_CODE
from .tracking import start_wandb


@dataclass
class Run:
    """Everything a stage needs before its trainer is built."""

    recipe: Any
    tokenizer: Any
    model: Any
    train_dataset: Any = None
    eval_dataset: Any = None
    data_report: Any = None
    callbacks: list = field(default_factory=list)
    wandb_mode: str | None = None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def router_loss_config(recipe, model) -> RouterLossConfig:
    """The recipe's router coefficients; a null balance_coef means the model config's own."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    balance = recipe.router.balance_coef
    return RouterLossConfig(
        balance_coef=config.router_aux_loss_coef if balance is None else balance,
        z_loss_coef=recipe.router.z_loss_coef,
        scope=recipe.router.balance_scope,
    )


def router_watch_config(recipe) -> WatchConfig:
    """Collapse thresholds from the recipe's router section."""
    return WatchConfig(
        collapse_share=recipe.router.collapse_share, collapse_patience=recipe.router.collapse_patience
    )


def build_model(recipe):
    """Base model, then adapters per the recipe (fresh LoRA, or continue a saved adapter).

    Under DeepSpeed ZeRO-3 the MoE blocks become ZeRO-3 leaves here, before any engine exists.
    """
    model = load_base_model(recipe.model)
    lora = recipe.lora
    if not lora.enabled:
        set_router_trainable(model, recipe.router.policy)
    elif lora.init_from:
        model = load_adapter(model, lora.init_from, is_trainable=True)
    else:
        config = make_lora_config(lora.targets, lora.r, lora.alpha, lora.dropout, recipe.router.policy)
        model = apply_lora(model, config)
    if zero3_enabled():
        register_moe_leaves(model)
    return model


def build_run(recipe, build_datasets) -> Run:
    """Seed, tokenizer, model, data (via `build_datasets(data_section, tokenizer)`), callbacks."""
    # Refused before minutes of model loading; the trainer checks again for trainers built directly.
    refuse_unsupported(recipe.reliability.on_nonfinite, _deepspeed_launch(recipe), recipe.source)
    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(tokenizer_source(recipe.model))
    model = build_model(recipe)
    train, evaluation, report = build_datasets(recipe.data, tokenizer)
    output_dir = Path(recipe.training.output_dir)
    callbacks = [MetricsFileCallback(output_dir / recipe.logging.metrics_file)]
    wandb_mode = start_wandb(recipe, is_main_process())
    return Run(recipe, tokenizer, model, train, evaluation, report, callbacks, wandb_mode)


def _deepspeed_launch(recipe) -> bool:
    """Whether this process trains under DeepSpeed (an Accelerate DeepSpeed launch or training.deepspeed)."""
    return bool(recipe.training.deepspeed) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def train(trainer, recipe) -> int:
    """Run `trainer.train` as the recipe says; the process exit code.

    0: finished. PREEMPTED_EXIT_CODE: a SIGTERM stopped it at a checkpoint (mixtune.train.signals).
    A fault mixtune detects (a NaN/Inf step, a damaged checkpoint, a recipe that no longer fits its
    checkpoint) ends the run with one line that names it: exit 1, or 2 for a recipe problem.
    """
    try:
        trainer.train(resume_from_checkpoint=recipe.training.resume_from_checkpoint)
    except (NonFiniteError, CheckpointError, RecipeError) as e:
        print(f"mixtune.{recipe.stage}: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, RecipeError) else 1
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


def use_compact_console(trainer) -> None:
    """Swap the Trainer's dict-printing progress callback for mixtune's compact one."""
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConsoleProgressCallback)


def count_parameters(model) -> tuple[int, int]:
    # A ZeRO-3 partitioned parameter is an empty local tensor; `ds_numel` is its full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def summary(run: Run, extra: dict[str, str] | None = None) -> str:
    """The start-up banner: what will train, on what, and where it goes."""
    recipe, model = run.recipe, run.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    trainable, total = count_parameters(model)
    lora = recipe.lora
    router = router_loss_config(recipe, model)
    lines = [
        f"mixtune {recipe.stage.upper()}  recipe: {recipe.source}",
        f"  model      {recipe.model.name_or_path}  ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, sliding window {cfg.sliding_window}, "
        f"{recipe.model.dtype})",
        f"  parameters {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        "  adapters   "
        + (
            f"LoRA r={lora.r} alpha={lora.alpha} dropout={lora.dropout} on {', '.join(lora.targets)}"
            + (f" (continuing {lora.init_from})" if lora.init_from else "")
            if lora.enabled
            else "none (full fine-tuning)"
        ),
        f"  router     policy {recipe.router.policy}; balance coef {router.balance_coef} ({router.scope} scope), "
        f"z-loss coef {router.z_loss_coef}",
        f"  data       {len(run.train_dataset):,} train / {len(run.eval_dataset) if run.eval_dataset else 0:,} eval "
        f"examples, max_length {recipe.data.max_length}, packing {recipe.data.packing}",
    ]
    if recipe.model.load_in_4bit:
        from mixtune.quant import memory_summary

        lines.append(f"  {'memory':<10} {memory_summary(base)}")
    lines += ["  " + line for line in run.data_report.summary().splitlines()]
    for key, value in (extra or {}).items():
        lines.append(f"  {key:<10} {value}")
    if zero3_enabled():
        lines.append(f"  {'zero3':<10} {zero3_summary(model)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lines.append(
        f"  training   {world} process(es), device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
        f"W&B {run.wandb_mode or 'off'}, output {recipe.training.output_dir}"
    )
    return "\n".join(lines)


def save_outputs(trainer, run: Run) -> Path:
    """Final weights (adapter or full), tokenizer, resolved recipe and data report in output_dir."""
    output_dir = Path(run.recipe.training.output_dir)
    trainer.save_model(str(output_dir))
    if trainer.accelerator.is_main_process:
        save_tokenizer(run.tokenizer, output_dir)
        save_resolved_recipe(run.recipe, output_dir / "recipe.yaml")
        (output_dir / "data_report.txt").write_text(run.data_report.summary() + "\n")
    return output_dir


def shutdown(finished: bool = True) -> None:
    """Close W&B and the process group so multi-process runs exit cleanly."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # After a finished run all ranks meet before any tears down: rank 0 hosts the rendezvous
        # store, and a rank whose gloo threads still talk to it when it goes aborts at exit (seen
        # as "terminate called without an active exception"). Not after a fault: the other ranks
        # may not be coming, and waiting for them would turn a failure into a hang.
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def build_trainer(trainer_cls, run: Run, eval_dataset: bool = True):
    """The stage's trainer (MixtuneSFTTrainer or MixtuneDPOTrainer) on the run, with mixtune's arguments."""
    recipe = run.recipe
    trainer = trainer_cls(
        model=run.model,
        args=recipe.training,
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset if eval_dataset else None,
        processing_class=run.tokenizer,
        callbacks=run.callbacks,
        router_cfg=router_loss_config(recipe, run.model),
        router_watch=router_watch_config(recipe),
        top_k=run.model.config.num_experts_per_tok,
        recipe=recipe,
    )
    use_compact_console(trainer)
    return trainer


def train_and_save(trainer, run: Run, banner: str) -> int:
    """Print the banner, train, save the outputs when training finished, close down: the exit code."""
    if trainer.accelerator.is_main_process:
        print(banner, flush=True)
    code = train(trainer, run.recipe)
    if code == 0:
        output_dir = save_outputs(trainer, run)
        if trainer.accelerator.is_main_process:
            print(f"saved to {output_dir}", flush=True)
    shutdown(finished=code == 0)
    return code
