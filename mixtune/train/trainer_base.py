"""What mixtune's SFT and DPO trainers share: router metrics, and holding up under faults.

    class MixtuneSFTTrainer(MixtuneTrainerMixin, SFTTrainer): ...

The mixin sits before TRL's trainer in the bases, so its overrides wrap TRL's and the Trainer's:
- router metrics (per-layer shares, drift, collapse) added to every log;
- checkpoints complete or ignored (mixtune.train.checkpoints): a stale `checkpoint-N/` is removed
  before N is saved, `COMPLETE` is written after every rank has finished, rotation is deferred
  until then; each checkpoint also carries the resolved recipe and mixtune's own run state;
- resume (mixtune.train.resume): `latest` or a path, verified; the recipe compared with the one
  saved; full weights loaded through mixtune's reader; no pickle with unsafe globals loaded;
- the NaN/Inf guard (mixtune.train.nonfinite), fed by the datasets' `where` column, which the mixin
  carries through column removal and collation and takes out before the model sees a batch;
- SIGTERM handled at the end of an optimizer step (mixtune.train.signals);
- `training.hub_token` kept out of the arguments the Trainer pickles into checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mixtune.lora.apply import ADAPTER_SAFETENSORS
from mixtune.model.weights import CheckpointError
from mixtune.recipe import recipe_to_dict, save_resolved_recipe
from mixtune.recipe.schema import RecipeError, ReliabilitySection
from mixtune.recipe.secrets import keep_hub_token_out_of_args

from .checkpoints import refuse_unsafe_pickles, remove_stale, rotate, write_complete
from .nonfinite import NonFiniteGuard, refuse_unsupported
from .objective import RouterLossConfig
from .resume import RECIPE_FILE, check_recipe, load_full_weights, resolve_checkpoint
from .router_metrics import RouterMetrics
from .routing_drift import REFERENCE_FILE, RoutingWatch, RoutingWatchCallback, WatchConfig
from .signals import StopOnSignal

STATE_FILE = "mixtune_state.json"
PROVENANCE = "where"  # the datasets' "file:line" column

logger = logging.getLogger("mixtune.trainer")


class KeepProvenance:
    """Collates as the wrapped collator does, then adds the batch's `where` list (TRL's ignore it)."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        where = [e[PROVENANCE] for e in examples] if examples and PROVENANCE in examples[0] else None
        batch = self.collator([{k: v for k, v in e.items() if k != PROVENANCE} for e in examples])
        if where is not None:
            batch[PROVENANCE] = where
        return batch


class _WatchCallback(RoutingWatchCallback):
    """The routing reference is written inside the checkpoint transaction, before COMPLETE, not on_save."""

    def on_save(self, args, state, control, **kwargs):
        return control


class _GuardCallback(TrainerCallback):
    """Runs the NaN/Inf check between gradient clipping and `optimizer.step()` (under DeepSpeed:
    after the engine's step, on its gradient norm)."""

    def __init__(self, trainer: MixtuneTrainerMixin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:  # DeepSpeed stepped inside backward already
            return control
        # With fp16 loss scaling, an overflowing gradient is routine: the scaler skips that step
        # and lowers its scale. The guard then checks losses only and leaves gradients to it.
        scaled = getattr(trainer.accelerator, "scaler", None) is not None
        params = [] if scaled else [p for group in optimizer.param_groups for p in group["params"]]
        trainer.nonfinite.before_optimizer_step(params, state.global_step + 1)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:  # the engine's step is done: was its gradient finite?
            trainer.nonfinite.after_engine_step(
                trainer.model_wrapped.get_global_grad_norm(), state.global_step
            )
        return control


class MixtuneTrainerMixin:
    """Shared by MixtuneSFTTrainer and MixtuneDPOTrainer; see the module docstring."""

    def __init__(
        self,
        *args,
        router_cfg: RouterLossConfig,
        top_k: int,
        router_watch: WatchConfig | None = None,
        recipe: Any = None,
        reliability: ReliabilitySection | None = None,
        **kwargs,
    ):
        keep_hub_token_out_of_args(kwargs.get("args"))  # before the Trainer, or its hub set-up, keeps it
        super().__init__(*args, **kwargs)
        # mixtune computes its own per-layer router losses; TRL's pooled aux loss stays off.
        self.aux_loss_enabled = False
        self.router_cfg = router_cfg
        self.top_k = top_k
        # Training metrics also watch drift from the starting routing and collapsing experts.
        self.routing_watch = RoutingWatch(router_watch)
        self.router_metrics = {"train": RouterMetrics(self.routing_watch), "eval": RouterMetrics()}
        self.add_callback(_WatchCallback(self.routing_watch))

        self.recipe = recipe
        self.reliability = reliability or (recipe.reliability if recipe is not None else ReliabilitySection())
        source = recipe.source if recipe is not None else "trainer"
        _refuse_pad_equal_to_eos(self.data_collator, self.processing_class, source)
        refuse_unsupported(self.reliability.on_nonfinite, self.is_deepspeed_enabled, source)
        world = self.args.world_size
        self.nonfinite = NonFiniteGuard(
            self.reliability.on_nonfinite,
            self.reliability.max_nonfinite_skips,
            any_rank=self._any_rank,
            gather=self._gather,
            rank_label=f"rank {self.args.process_index} " if world > 1 else "",
        )
        self.add_callback(_GuardCallback(self))
        self.stop_signal = StopOnSignal(lambda flag: bool(self._any_rank(torch.tensor([flag])).item()))
        self.add_callback(self.stop_signal)
        self.data_collator = KeepProvenance(self.data_collator)
        self._samples: list[str] | None = None
        self._saved_steps: set[int] = set()

    # --- ranks ------------------------------------------------------------------------------------

    def _any_rank(self, flag: torch.Tensor) -> torch.Tensor:
        """True on every rank when `flag` is true on any (one all-reduce; none on one process)."""
        if self.args.world_size <= 1 or not dist.is_initialized():
            return flag.bool()
        value = flag.detach().to(self.args.device, torch.float32).reshape(1)  # NCCL wants device tensors
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value > 0

    def _gather(self, items: list) -> list:
        if self.args.world_size <= 1 or not dist.is_initialized():
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    # --- batches: provenance in, never into the model -------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PROVENANCE not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PROVENANCE]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._samples = inputs.pop(PROVENANCE, None)
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != PROVENANCE}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def guard_loss(self, loss: torch.Tensor) -> None:
        """Call with each training micro-batch's loss, before backward."""
        if self.is_deepspeed_enabled:  # the engine steps inside backward: decide now
            self.nonfinite.check_loss_now(loss, self._samples, self.state.global_step + 1)
        else:
            self.nonfinite.observe(loss, self._samples)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        logs.update(self.router_metrics[mode].compute("router" if mode == "train" else "eval_router"))
        if mode == "train" and "loss" in logs and self.reliability.on_nonfinite == "skip":
            logs["nonfinite_skipped"] = len(self.nonfinite.skipped)
        super().log(logs, start_time)

    # --- checkpoints: complete or ignored -------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        if step in self._saved_steps:  # the Trainer may ask again at an epoch end: same step, same state
            return
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save:
            remove_stale(folder)
        self.accelerator.wait_for_everyone()  # no rank writes into it before it is cleared
        # The Trainer rotates at the end of its save, before COMPLETE exists: mixtune rotates after.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            self._save_run_state(folder)
        self.accelerator.wait_for_everyone()  # every rank's files are written
        if self.args.should_save:
            write_complete(folder, step)
            rotate(run_dir, limit, keep=self.state.best_model_checkpoint)
        self._saved_steps.add(step)

    def _save_run_state(self, folder: Path) -> None:
        """What mixtune adds to a checkpoint: its recipe, the routing reference, counters a resume needs."""
        if self.recipe is not None:
            save_resolved_recipe(self.recipe, folder / RECIPE_FILE)
        self.routing_watch.save(folder / REFERENCE_FILE)
        below = self.routing_watch._below_LE  # collapse streaks continue across a resume
        state = {
            "nonfinite_skipped_steps": self.nonfinite.skipped,
            "total_train_tokens": getattr(self, "_total_train_tokens", 0),
            "collapse_streaks": below.tolist() if below is not None else None,
        }
        (folder / STATE_FILE).write_text(json.dumps(state) + "\n")

    def _load_run_state(self, checkpoint: Path) -> None:
        path = checkpoint / STATE_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.nonfinite.skipped = list(state.get("nonfinite_skipped_steps", []))
        if hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = state.get("total_train_tokens", 0)
        if state.get("collapse_streaks") is not None:
            self.routing_watch._below_LE = torch.tensor(state["collapse_streaks"], dtype=torch.long)

    # --- resume ---------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        checkpoint = self._on_main_then_shared(lambda: self._checked_checkpoint(resume_from_checkpoint))
        if checkpoint is not None:
            self._load_run_state(checkpoint)
        with self.stop_signal.armed():
            return super().train(
                resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None,
                trial=trial,
                **kwargs,
            )

    def _checked_checkpoint(self, resume: str | bool | None) -> Path | None:
        """The checkpoint to resume from, verified, pickle-scanned and checked against the recipe."""
        checkpoint = resolve_checkpoint(resume, self.args.output_dir)
        if checkpoint is None:
            return None
        refuse_unsafe_pickles(checkpoint, deepspeed=self.is_deepspeed_enabled)
        if self.is_deepspeed_enabled:
            logger.warning(
                "resume: DeepSpeed reads its own files in %s with torch.load(weights_only=False); mixtune "
                "checked the classes they name, but resume only from checkpoints your runs wrote",
                checkpoint,
            )
        if self.recipe is not None:
            current = recipe_to_dict(self.recipe)
            check_recipe(checkpoint, current, self.reliability.allow_recipe_changes, self.recipe.source)
        logger.warning("resume: continuing from %s", checkpoint)
        return checkpoint

    @property
    def preempted(self) -> bool:
        """Whether a SIGTERM stopped training before max_steps (a checkpoint of that step was saved)."""
        stopped = self.stop_signal.stopped_at
        return stopped is not None and stopped < self.state.max_steps

    def _on_main_then_shared(self, fn):
        """Run `fn` on the main process and give every rank its result (or its error), so all agree."""
        if self.args.world_size <= 1 or not dist.is_initialized():
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # sent to every rank, raised there
                box[0] = ("error", e)
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        checkpoint = Path(resume_from_checkpoint)
        if hasattr(model, "peft_config"):
            _require_safetensors_adapters(checkpoint)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_full_weights(self.accelerator.unwrap_model(model), checkpoint)

    def _load_best_model(self):
        if hasattr(self.model, "peft_config") or self.is_deepspeed_enabled:
            _require_safetensors_adapters(Path(self.state.best_model_checkpoint))
            return super()._load_best_model()
        load_full_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def _refuse_pad_equal_to_eos(collator: Any, tokenizer: Any, source: Any) -> None:
    """Padding must not be EOS: anything that masks padding (labels, attention) would mask every </s>."""
    pad = getattr(collator, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if pad is not None and pad == eos:
        raise RecipeError(
            f"{source}: training.pad_token: padding with the EOS token ({tokenizer.eos_token!r}, id {eos}) would "
            "let padding masks hide every real </s>, and the model would not learn to stop; leave "
            "training.pad_token unset (mixtune pads with <unk>, id 0)"
        )


def _require_safetensors_adapters(checkpoint: Path) -> None:
    """PEFT falls back to adapter_model.bin (a pickle); mixtune reads adapters from safetensors only."""
    for directory in [checkpoint, *(p for p in checkpoint.iterdir() if p.is_dir())]:
        if (directory / "adapter_model.bin").is_file() and not (directory / ADAPTER_SAFETENSORS).is_file():
            raise CheckpointError(
                f"{directory / 'adapter_model.bin'}: adapter weights as a pickle are refused (unpickling can run "
                f"code); mixtune reads only {ADAPTER_SAFETENSORS}"
            )
