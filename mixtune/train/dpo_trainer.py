"""TRL's DPOTrainer on mixtune's pre-tokenised pairs, with router losses on the policy pass.

TRL owns the preference losses (sigmoid, IPO and every other `loss_type`), the reference handling
(adapter disabled, a frozen "ref" copy of a continued adapter, or precomputed log-probs) and the
reward metrics. mixtune adds the router balance and z-loss of the policy forward only, never the
reference's, computed over the completion tokens.
"""

from __future__ import annotations

from trl import DPOTrainer

from .fused_head import install_fused_head
from .router_loss import loss_token_mask, router_losses
from .routing_recorder import RoutingRecorder
from .trainer_base import PROVENANCE, MixtuneTrainerMixin


class MixtuneDPOTrainer(MixtuneTrainerMixin, DPOTrainer):
    """DPO with router losses on the policy pass; router metrics, checkpoints, resume and the NaN/Inf
    guard come from mixtune.train.trainer_base (constructor: DPOTrainer's arguments plus its keywords).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        needed = ("log_probs", "entropy", "mean_logits", "is_top1") + (
            ("log_sum_sq_probs",) if self.use_weighting else ()
        )
        install_fused_head(base, needed)
        if self.ref_model is not None:
            install_fused_head(self.ref_model)
        self.routing = RoutingRecorder(self.model)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # mixtune tokenises pairs itself (exact Mixtral v1 ids; see mixtune.data.preference), and
        # TRL 1.16 would re-render them through a chat template.
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        with self.routing.recording() as passes:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)
        # TRL runs the policy forward first; a reference forward, when there is one, comes after.
        policy_logits = tuple(passes[0])
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        router = router_losses(
            policy_logits, loss_token_mask(labels), self.top_k, scope=self.router_cfg.scope
        )
        self.router_metrics[mode].add(router)
        if mode == "train":
            loss = (
                loss
                + self.router_cfg.balance_coef * router.balance
                + self.router_cfg.z_loss_coef * router.z_loss
            )
            self.guard_loss(loss)
        return (loss, outputs) if return_outputs else loss

    def compute_ref_log_probs(self, model, inputs):
        # Provenance is for messages, not a model input (TRL passes the rest of the batch on).
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != PROVENANCE})
