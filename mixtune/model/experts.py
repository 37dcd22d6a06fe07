"""The experts of one MoE layer: stacked SwiGLU weights, run over tokens grouped by expert.

gate_up_proj (E, 2I, D) holds each expert's gate (w1) and up (w3) projections stacked, so both
run as one grouped product; down_proj (E, D, I) holds its down projection (w2). This is the layout
transformers 5 uses, so checkpoints map 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import RoutingPlan, grouped_linear, plan_routing


class ExpertProjection(nn.Module):
    """Where an adapter attaches to one projection of every expert: w1 (gate), w3 (up) or w2 (down).

    It holds no weights of its own (they stay stacked in the experts, so gate and up remain one
    product) and adds nothing: forward returns None. mixtune.lora swaps it, through PEFT, for a
    layer that returns the LoRA term computed on the grouped tokens. `weight` is a view of this
    projection's slice of the stacked parameter, which PEFT reads for device and dtype and LoRA
    merges into.
    """

    # True on the attachment points of 4-bit experts (mixtune.quant), where LoRA cannot merge.
    quantized: bool = False

    def __init__(self, owner: GroupedExperts, name: str):
        super().__init__()
        # A plain reference, not a registered submodule: the owner is the parent in the module
        # tree, and deepcopy (reference models, ModulesToSaveWrapper) keeps the pair consistent.
        object.__setattr__(self, "_owner", owner)
        self.name = name
        self.num_experts = owner.num_experts
        if name == "w2":
            self.in_features, self.out_features = owner.intermediate_size, owner.hidden_size
        else:
            self.in_features, self.out_features = owner.hidden_size, owner.intermediate_size

    @property
    def weight(self) -> torch.Tensor:
        """(E, out, in) view of this projection inside the stacked parameter."""
        owner, inter = self._owner, self._owner.intermediate_size
        if owner.gate_up_proj.dim() != 3:
            # A DeepSpeed ZeRO-3 shard outside a gather is flat: no per-projection view exists, and
            # what PEFT reads here (device, dtype) is the same for the whole parameter.
            return owner.down_proj if self.name == "w2" else owner.gate_up_proj
        if self.name == "w1":
            return owner.gate_up_proj[:, :inter]
        if self.name == "w3":
            return owner.gate_up_proj[:, inter:]
        return owner.down_proj

    def forward(self, x_NI: torch.Tensor, plan: RoutingPlan) -> torch.Tensor | None:
        return None

    def extra_repr(self) -> str:
        return f"{self.name}: {self.num_experts} x ({self.in_features} -> {self.out_features})"


class GroupedExperts(nn.Module):
    """E SwiGLU experts evaluated only on the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Attachment points for LoRA on Mixtral's w1 (gate), w3 (up) and w2 (down). Not named
        # w1/w2/w3 themselves: PEFT rewrites targets with those names on model_type "mixtral".
        self.w1_proj = ExpertProjection(self, "w1")
        self.w3_proj = ExpertProjection(self, "w3")
        self.w2_proj = ExpertProjection(self, "w2")

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2I, D), down (E, D, I)); 4-bit experts return `PerExpertWeights` instead."""
        return self.gate_up_proj, self.down_proj

    def forward(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """(T, D) tokens, their (T, K) experts and weights -> (T, D) weighted sum of expert outputs."""
        plan = plan_routing(expert_ids_TK, weights_TK, self.num_experts)
        gate_up_w, down_w = self.expert_weights()
        x_ND = x_TD[plan.token_index]
        gate_NI, up_NI = grouped_linear(x_ND, gate_up_w, plan).chunk(2, dim=-1)
        if (extra := self.w1_proj(x_ND, plan)) is not None:
            gate_NI = gate_NI + extra
        if (extra := self.w3_proj(x_ND, plan)) is not None:
            up_NI = up_NI + extra
        h_NI = F.silu(gate_NI) * up_NI
        y_ND = grouped_linear(h_NI, down_w, plan)
        if (extra := self.w2_proj(h_NI, plan)) is not None:
            y_ND = y_ND + extra
        # Weighted in the routing weights' fp32, then cast, as transformers rounds in bf16.
        y_ND = (y_ND * plan.weights[:, None]).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, plan.token_index, y_ND)


def experts_reference(
    experts: GroupedExperts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """The test oracle: each expert as a plain SwiGLU over its tokens, one at a time, no sorting."""
    out = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        token_idx, choice = torch.where(expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        w1, w3 = experts.gate_up_proj[e].chunk(2, dim=0)
        x = x_TD[token_idx]
        y = (F.silu(x @ w1.T) * (x @ w3.T)) @ experts.down_proj[e].T
        out = out.index_add(0, token_idx, y * weights_TK[token_idx, choice, None].to(y.dtype))
    return out
