"""TRL's SFTTrainer with mixtune's objective: LM loss on label positions plus router losses.

TRL keeps what it is good at (pre-tokenised datasets, packing, collation, checkpoints, logging);
mixtune replaces `compute_loss` because TRL hides router logits from it and, on a CPU, projects
the LM head at every position.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from .objective import sft_objective
from .trainer_base import PROVENANCE, MixtuneTrainerMixin


class MixtuneSFTTrainer(MixtuneTrainerMixin, SFTTrainer):
    """SFT whose loss adds the router balance and z-loss, and whose logs carry router metrics.

    Constructor: SFTTrainer's arguments plus router_cfg, top_k, router_watch, recipe, reliability
    (mixtune.train.trainer_base, which also holds checkpointing, resume and the NaN/Inf guard).
    """

    # sft_objective divides by the step's token count itself (num_items_in_batch).
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        # Eval reports the plain LM loss, comparable across runs with other router settings.
        objective = sft_objective(
            model,
            inputs,
            self.router_cfg,
            self.top_k,
            num_items_in_batch=num_items_in_batch if mode == "train" else None,
            with_router_loss=mode == "train",
        )
        self.router_metrics[mode].add(objective.router)
        lm = objective.lm
        tokens = max(int(self.accelerator.gather_for_metrics(lm.tokens).sum()), 1)
        self._metrics[mode]["mean_token_accuracy"].append(
            float(self.accelerator.gather_for_metrics(lm.correct).sum()) / tokens
        )
        if mode == "train":
            batch_tokens = (
                inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            )
            batch_tokens = torch.as_tensor(batch_tokens, device=inputs["input_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(batch_tokens).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            self.guard_loss(objective.loss)
        return (objective.loss, objective) if return_outputs else objective.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # mixtune never materialises full-vocabulary logits, so evaluation reports losses only.
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != PROVENANCE})
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
