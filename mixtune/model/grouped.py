"""Tokens sorted by expert into contiguous groups, and one matrix product per group.

`grouped_linear` is the single primitive the experts (and their LoRA) are built from: on CUDA in
bf16 it is one `torch._grouped_mm` call; elsewhere a loop of `mm` over the groups (grouped_loop.py), which touches
only the tokens each expert owns and, for frozen weights, computes no weight gradient. Weights kept
in another form (4-bit, see mixtune.quant) take the loop, each expert applying itself to its group.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from .grouped_loop import GroupedLinearLoop


@dataclass
class RoutingPlan:
    """The (T*K) token-expert pairs sorted by expert.

    token_index: (N,) source token of each sorted row; weights: (N,) its routing weight;
    counts: (E,) rows per expert; offsets: (E,) int32 cumulative ends, all on the device, so
    `torch._grouped_mm` runs without a host sync. `group_sizes` (host ints) is read, and the
    device synchronised, only when a loop over the groups needs it.
    """

    token_index: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @cached_property
    def group_sizes(self) -> list[int]:
        return self.counts.tolist()


def plan_routing(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort every (token, choice) pair by expert; a stable sort keeps token order inside a group."""
    flat_ids = expert_ids_TK.reshape(-1)
    order = flat_ids.argsort(stable=True)
    top_k = expert_ids_TK.shape[1]
    # index_add rather than bincount: bincount sizes its output from the data (a host sync on GPUs).
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_ids.device)
    counts.index_add_(0, flat_ids, torch.ones_like(flat_ids))
    return RoutingPlan(
        token_index=order // top_k,
        weights=weights_TK.reshape(-1)[order],
        counts=counts,
        offsets=counts.cumsum(0).to(torch.int32),
    )


def _can_use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The fused kernel pays on GPUs in bf16; on CPU it is no faster than the loop and has no
    # backward (measured with torch 2.13), and it needs 16-byte aligned strides.
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and x.shape[-1] % 8 == 0
        and weight.shape[1] % 8 == 0
    )


class PerExpertWeights(Protocol):
    """E frozen (O, I) matrices stored so that only one expert is ever materialised (e.g. NF4)."""

    num_experts: int
    out_features: int

    def linear(self, x_nI: torch.Tensor, e: int) -> torch.Tensor:
        """(n, I) rows times expert e's weight^T -> (n, O); the weight gets no gradient."""
        ...


def grouped_linear(
    x_NI: torch.Tensor, weight_EOI: torch.Tensor | PerExpertWeights, plan: RoutingPlan
) -> torch.Tensor:
    """Rows of group e times weight[e]^T: (N, I) -> (N, O), groups laid out as in `plan`.

    `weight_EOI` is a stacked (E, O, I) tensor, or `PerExpertWeights` applied one group at a time.
    """
    if isinstance(weight_EOI, torch.Tensor):
        if _can_use_grouped_mm(x_NI, weight_EOI):
            return torch._grouped_mm(x_NI, weight_EOI.transpose(1, 2), offs=plan.offsets)
        return GroupedLinearLoop.apply(x_NI.contiguous(), weight_EOI, plan.group_sizes)
    linear, out_features = weight_EOI.linear, weight_EOI.out_features
    outputs = [
        linear(group, e) for e, group in enumerate(x_NI.split(plan.group_sizes)) if plan.group_sizes[e] > 0
    ]
    if not outputs:
        return x_NI.new_zeros(0, out_features)
    return torch.cat(outputs)
