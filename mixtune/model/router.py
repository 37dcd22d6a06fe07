"""The router: a linear score per expert, top-k of E, in fp32 whatever the model dtype.

Also the two router losses, per layer, over the tokens that count:
- Switch Transformer load balance, E * sum_e f_e * P_e (f_e: share of tokens sent to e, P_e: mean
  router probability of e), on transformers' scale (f sums to k, so perfect balance gives k);
- ST-MoE z-loss, mean of logsumexp(logits)^2, which keeps router logits small and stable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RouterLinear(nn.Linear):
    """A bias-free linear layer that always computes in fp32.

    Routing decisions flip on small logit differences, so they are made in fp32 even when the
    model runs in bf16. It stays an nn.Linear so the router can take a standard PEFT LoRA.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


@dataclass
class Routing:
    """Where each token goes: (T, K) weights summing to 1, (T, K) expert ids, (T, E) raw logits."""

    weights: torch.Tensor
    expert_ids: torch.Tensor
    logits: torch.Tensor


class TopKRouter(nn.Module):
    """Scores E experts per token and keeps the top k."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        # Not named `gate`: PEFT rewrites LoRA targets called gate/w1/w2/w3 on any model whose
        # config says model_type "mixtral" (its transformers 4 -> 5 conversion), which is not ours.
        self.proj = RouterLinear(hidden_size, num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.proj(x_TD)
        # Mixtral's order: top-k on the logits, then softmax over the k chosen, which equals a
        # softmax over all E renormalised over the chosen k.
        top_logits_TK, expert_ids_TK = logits_TE.topk(self.top_k, dim=-1)
        return Routing(top_logits_TK.softmax(dim=-1), expert_ids_TK, logits_TE)


def expert_counts(logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) number of counted tokens each expert received (as a first or later choice)."""
    chosen_TK = logits_TE.topk(top_k, dim=-1).indices
    weight_T = torch.ones(logits_TE.shape[0], device=logits_TE.device) if mask_T is None else mask_T.float()
    counts = torch.zeros(logits_TE.shape[1], device=logits_TE.device)
    return counts.index_add_(0, chosen_TK.reshape(-1), weight_T.repeat_interleave(top_k))


def load_balance_loss(
    logits_TE: torch.Tensor, top_k: int, mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch balance loss of one layer over the tokens where mask_T is true (all when None)."""
    num_experts = logits_TE.shape[1]
    probs_TE = logits_TE.float().softmax(dim=-1)
    if mask_T is None:
        num_tokens = logits_TE.shape[0]
        prob_sum_E = probs_TE.sum(dim=0)
    else:
        num_tokens = mask_T.float().sum().clamp(min=1)
        prob_sum_E = (probs_TE * mask_T.float()[:, None]).sum(dim=0)
    tokens_per_expert = expert_counts(logits_TE, top_k, mask_T) / num_tokens
    return num_experts * (tokens_per_expert * prob_sum_E / num_tokens).sum()


def router_z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss of one layer: mean over counted tokens of logsumexp(logits)^2."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if mask_T is None:
        return z_T.mean()
    return (z_T * mask_T.float()).sum() / mask_T.float().sum().clamp(min=1)
