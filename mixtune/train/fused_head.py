"""TRL's "fused LM head" contract, computed only at the positions that carry a label.

TRL's trainers call `model(..., labels=..., fused_lm_head=True)` and read per-token log-probs (and
entropy, mean logit, top-1 hit) from a `FusedCausalLMOutput`. TRL's own head scores every position
on devices without Triton, through vocabulary tiles folded in Python: about 5 s per DPO step on
the tiny CPU model. mixtune's model already projects only selected positions (`logits_to_keep`),
so this head asks for the labelled positions, scores them densely, and scatters the results back
to the (B, T-1) layout TRL expects.
"""

from __future__ import annotations

import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

from .router_loss import loss_token_mask


def _scatter(mask_BT: torch.Tensor, values_N: torch.Tensor) -> torch.Tensor:
    """Values at the masked positions, zeros elsewhere; stays differentiable."""
    return values_N.new_zeros(mask_BT.shape).masked_scatter(mask_BT, values_N)


def install_fused_head(
    model, outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")
) -> None:
    """Make `model(..., labels, fused_lm_head=True)` return TRL's fused output, computed compactly."""
    plain_forward = type(model).forward

    def forward(self, *args, fused_lm_head: bool = False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return plain_forward(self, *args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs.pop("use_cache", None)
        keep_BT = loss_token_mask(labels)  # position t predicts labels[t + 1]
        out = plain_forward(self, *args, logits_to_keep=keep_BT, **kwargs)
        logits_NV = out.logits.float()
        targets_N = labels[:, 1:][keep_BT[:, :-1]]
        log_probs_NV = logits_NV.log_softmax(dim=-1)
        token_lp_N = log_probs_NV.gather(1, targets_N[:, None]).squeeze(1)
        mask = keep_BT[:, :-1]
        fields = {"log_probs": _scatter(mask, token_lp_N)}
        with torch.no_grad():
            if "entropy" in outputs:
                fields["entropy"] = _scatter(mask, -(log_probs_NV.exp() * log_probs_NV).sum(-1))
            if "mean_logits" in outputs:
                fields["mean_logits"] = _scatter(mask, logits_NV.mean(-1))
            if "is_top1" in outputs:
                fields["is_top1"] = _scatter(mask, (logits_NV.argmax(-1) == targets_N).float()).bool()
            if "log_sum_sq_probs" in outputs:
                fields["log_sum_sq_probs"] = _scatter(mask, torch.logsumexp(2 * log_probs_NV, dim=-1))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -token_lp_N.sum() / count
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=out.aux_loss, **fields)

    model.forward = types.MethodType(forward, model)
