"""The sparse MoE block: a router picks k experts per token, the experts run on their tokens."""

from __future__ import annotations

import torch
from torch import nn

from .experts import GroupedExperts
from .router import TopKRouter


class MoEBlock(nn.Module):
    """Built by injection so routers and experts can be swapped (quantised, LoRA-wrapped) freely.

    Under DeepSpeed ZeRO-3 this module is registered as a leaf (see mixtune.distributed) so every
    rank gathers all experts' weights at once, whatever its tokens chose: no rank waits on an
    expert another rank never touches.
    """

    def __init__(self, router: TopKRouter, experts: GroupedExperts):
        super().__init__()
        self.router = router
        self.experts = experts

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> (B, T, D) output and the (B*T, E) fp32 router logits."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = self.router(x_TD)
        y_TD = self.experts(x_TD, routing.expert_ids, routing.weights)
        return y_TD.view(B, T, D), routing.logits
