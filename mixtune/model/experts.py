"""The experts of one MoE layer: stacked SwiGLU weights, run over tokens grouped by expert.

gate_up_proj (E, 2I, D) holds each expert's gate (w1) and up (w3) projections stacked, down_proj
(E, D, I) its down projection (w2): the layout transformers 5 uses, so checkpoints map 1:1.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import RoutingPlan, grouped_linear, plan_routing


class ExpertDelta(Protocol):
    """Additive terms on the grouped projections (LoRA implements this; see mixtune.lora)."""

    def gate_up(self, x_ND: torch.Tensor, plan: RoutingPlan) -> torch.Tensor | None: ...

    def down(self, h_NI: torch.Tensor, plan: RoutingPlan) -> torch.Tensor | None: ...


class GroupedExperts(nn.Module):
    """E SwiGLU experts evaluated only on the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2I, D), down (E, D, I)) as dense tensors; quantised experts override this."""
        return self.gate_up_proj, self.down_proj

    def forward(
        self,
        x_TD: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        delta: ExpertDelta | None = None,
    ) -> torch.Tensor:
        """(T, D) tokens, their (T, K) experts and weights -> (T, D) weighted sum of expert outputs."""
        plan = plan_routing(expert_ids_TK, weights_TK, self.num_experts)
        gate_up_w, down_w = self.expert_weights()
        x_ND = x_TD[plan.token_index]
        gate_up_N2I = grouped_linear(x_ND, gate_up_w, plan)
        if delta is not None and (extra := delta.gate_up(x_ND, plan)) is not None:
            gate_up_N2I = gate_up_N2I + extra
        gate_NI, up_NI = gate_up_N2I.chunk(2, dim=-1)
        h_NI = F.silu(gate_NI) * up_NI
        y_ND = grouped_linear(h_NI, down_w, plan)
        if delta is not None and (extra := delta.down(h_NI, plan)) is not None:
            y_ND = y_ND + extra
        # Weighted in the routing weights' fp32, then cast, as transformers rounds in bf16.
        y_ND = (y_ND * plan.weights[:, None]).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, plan.token_index, y_ND)


def experts_reference(
    experts: GroupedExperts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """The test oracle: each expert as a plain SwiGLU over its tokens, one at a time, no sorting."""
    gate_up_w, down_w = experts.expert_weights()
    out = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        token_idx, choice = torch.where(expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        w1, w3 = gate_up_w[e].chunk(2, dim=0)
        x = x_TD[token_idx]
        y = (F.silu(x @ w1.T) * (x @ w3.T)) @ down_w[e].T
        out = out.index_add(0, token_idx, y * weights_TK[token_idx, choice, None].to(y.dtype))
    return out
