"""Expert shares and repetition between consecutive tokens, per layer, as the Mixtral paper counts them.

Mixtral of Experts (Jiang et al., 2024), section 5 and Table 5: "the proportion of times the same
expert is assigned to a token i and its following token i+1", reported two ways:
- first choice: token i+1's top expert is token i's top expert;
- first or second choice: the same expert appears among both tokens' top-k (the two top-2 sets
  share an expert).
Pairs never straddle two sequences.

Random baselines, with every token's top-k an independent uniform draw of k distinct experts of E:
- first choice: 1/E (12.5% for E=8);
- first or second: 1 - C(E-k, k) / C(E, k), one minus the chance that the second token's k experts
  all avoid the first token's k (1 - 15/28 = 46.4% for E=8, k=2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Mixtral 8x7B on The Pile (paper, Table 5), the yardstick a trained model is read against. Layer 0
# sits near the random baseline; mid-depth layers repeat experts about twice as often as chance.
PAPER_REFERENCE = (
    "Mixtral 8x7B on The Pile (Mixtral paper, Table 5): first-choice repetition about 14% at layer 0 "
    "(random: 12.5%) and 24-28% at layer 15 across domains; first-or-second repetition near the 46% "
    "random baseline at layer 0 and well above it at layer 15. A trained model's layer 0 sits near "
    "random; mid-depth layers show positional locality."
)


def random_baselines(num_experts: int, top_k: int) -> tuple[float, float]:
    """(first-choice, top-k) repetition rates of uniformly random routing (see the module docstring)."""
    first = 1.0 / num_experts
    topk = 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return first, topk


@dataclass
class LayerStats:
    """One layer's results: shares sum to 1 over experts; repeats are fractions of consecutive pairs."""

    first_share: list[float]
    topk_share: list[float]
    first_repeat: float
    topk_repeat: float


class RoutingStats:
    """Counts over many sequences; `add` one sequence's (L, T, K) expert ids, `layers()` at the end."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.first_LE = torch.zeros(num_layers, num_experts)
        self.topk_LE = torch.zeros(num_layers, num_experts)
        self.first_repeat_L = torch.zeros(num_layers)
        self.topk_repeat_L = torch.zeros(num_layers)
        self.tokens = 0
        self.pairs = 0

    def add(self, expert_ids_LTK: torch.Tensor) -> None:
        """One sequence's choices, k ordered best first (as torch.topk gives them)."""
        ids_LTK = expert_ids_LTK.long().cpu()
        L, T, K = ids_LTK.shape
        onehot_LTE = torch.zeros(L, T, self.num_experts).scatter_(2, ids_LTK, 1.0)
        self.topk_LE += onehot_LTE.sum(dim=1)
        self.first_LE += onehot_LTE.new_zeros(L, self.num_experts).scatter_add_(
            1, ids_LTK[:, :, 0], torch.ones(L, T)
        )
        self.first_repeat_L += (ids_LTK[:, 1:, 0] == ids_LTK[:, :-1, 0]).float().sum(dim=1)
        # Sets intersect <=> some expert is chosen by both tokens.
        shared_LT = (onehot_LTE[:, 1:] * onehot_LTE[:, :-1]).sum(dim=-1) > 0
        self.topk_repeat_L += shared_LT.float().sum(dim=1)
        self.tokens += T
        self.pairs += max(T - 1, 0)

    def layers(self) -> list[LayerStats]:
        first_LE = self.first_LE / self.first_LE.sum(dim=1, keepdim=True).clamp(min=1)
        topk_LE = self.topk_LE / self.topk_LE.sum(dim=1, keepdim=True).clamp(min=1)
        pairs = max(self.pairs, 1)
        return [
            LayerStats(
                first_share=first_LE[layer].tolist(),
                topk_share=topk_LE[layer].tolist(),
                first_repeat=self.first_repeat_L[layer].item() / pairs,
                topk_repeat=self.topk_repeat_L[layer].item() / pairs,
            )
            for layer in range(first_LE.shape[0])
        ]
