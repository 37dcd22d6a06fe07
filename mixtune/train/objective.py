"""The SFT objective for one micro-batch: LM loss + balance_coef * balance + z_loss_coef * z-loss.

Every term is a sum over this micro-batch's counted tokens divided by the step's token count
(`num_items_in_batch`, all micro-batches and ranks), so summing micro-batches gives the loss of
the whole step whatever the split (see router_loss.py for the balance term's groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .losses import LMLoss, lm_loss, next_token_targets
from .router_loss import RouterLosses, loss_token_mask, router_losses


@dataclass
class RouterLossConfig:
    balance_coef: float
    z_loss_coef: float
    scope: str = "global"


@dataclass
class Objective:
    loss: torch.Tensor
    lm: LMLoss
    router: RouterLosses


def sft_objective(
    model,
    inputs: dict[str, torch.Tensor],
    router_cfg: RouterLossConfig,
    top_k: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    with_router_loss: bool = True,
) -> Objective:
    """Loss of one micro-batch (input_ids, labels, optional attention_mask / position_ids)."""
    labels = inputs["labels"]
    keep = loss_token_mask(labels)
    position_ids = inputs.get("position_ids")
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        position_ids=position_ids,
        output_router_logits=True,
        logits_to_keep=keep,
    )
    lm = lm_loss(outputs.logits, next_token_targets(labels, keep))
    if num_items_in_batch is None:
        loss = lm.loss_sum / lm.tokens.clamp(min=1)
    else:
        # num_items_in_batch counts every rank's tokens while DDP/DeepSpeed average gradients.
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        loss = lm.loss_sum / torch.as_tensor(num_items_in_batch).clamp(min=1) * world
    router = router_losses(
        outputs.router_logits,
        keep,
        top_k,
        num_items_in_batch,
        position_ids_BT=position_ids,
        scope=router_cfg.scope,
    )
    if with_router_loss:
        loss = loss + router_cfg.balance_coef * router.balance + router_cfg.z_loss_coef * router.z_loss
    return Objective(loss, lm, router)
