"""Router balance and z-loss for training, scaled so the split of a batch does not matter.

Both losses are averaged over layers and over the tokens that carry LM loss (positions whose
next-token label is not -100), and normalised by the number of such tokens in the whole optimizer
step (all micro-batches, all ranks: the Trainer's `num_items_in_batch`), like the LM loss. Then:
- z-loss, a per-token mean, is exactly independent of how the step is split;
- balance loss E * sum_e f_e * P_e is written per token as E/N * sum_t sum_e f_{g(t),e} p_{t,e},
  where f is the routing share of the token's group g(t) (a constant, no gradient):
  * scope "global": the group is the current micro-batch on every rank (expert counts are summed
    across ranks), so data parallelism gives exactly the single-process loss and gradients;
    under gradient accumulation each micro-batch uses its own counts, weighted by its tokens;
  * scope "sequence": the group is one example (a row, or one packed example), so the loss is
    exactly independent of micro-batch size, accumulation and ranks.
The result is multiplied by the number of processes, as the LM loss is, because DDP and DeepSpeed
average gradients across ranks while the normaliser already counts every rank's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mixtune.model.mask import segment_ids


@dataclass
class RouterLosses:
    """Mean over layers of the balance and z-losses (differentiable), and per-layer detached stats."""

    balance: torch.Tensor
    z_loss: torch.Tensor
    counts_LE: torch.Tensor  # tokens routed to each expert per layer (first or later choice)
    z_sum_L: torch.Tensor  # sum over counted tokens of logsumexp^2, per layer
    balance_L: torch.Tensor  # per-layer balance value on this micro-batch (for metrics)
    entropy_sum_L: torch.Tensor  # sum over counted tokens of the router distribution's entropy
    tokens: torch.Tensor  # counted tokens on this rank


def loss_token_mask(labels_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) True where the position predicts a label (labels are shifted inside the loss)."""
    mask = torch.zeros_like(labels_BT, dtype=torch.bool)
    mask[:, :-1] = labels_BT[:, 1:] != -100
    return mask


def _group_ids(
    mask_BT: torch.Tensor, position_ids_BT: torch.Tensor | None, scope: str
) -> torch.Tensor | None:
    """(N,) group index per token for the sequence scope; None for the global scope."""
    if scope == "global":
        return None
    B, T = mask_BT.shape
    if position_ids_BT is None:
        seg = torch.zeros(B, T, dtype=torch.long, device=mask_BT.device)
    else:
        seg = segment_ids(position_ids_BT) - 1
    rows = torch.arange(B, device=mask_BT.device)[:, None] * (T + 1)
    return (rows + seg).reshape(-1)


def router_losses(
    router_logits: tuple[torch.Tensor, ...],
    mask_BT: torch.Tensor,
    top_k: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    position_ids_BT: torch.Tensor | None = None,
    scope: str = "global",
) -> RouterLosses:
    """Router losses over the counted tokens of one micro-batch (see the module docstring)."""
    mask_N = mask_BT.reshape(-1)
    weight_N = mask_N.float()
    tokens = weight_N.sum()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is None:
        normaliser, world = tokens.clamp(min=1), 1
    else:
        normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask_N.device).clamp(
            min=1
        )
    groups = _group_ids(mask_BT, position_ids_BT, scope)

    balance_terms, z_terms, counts, z_sums, balances, entropies = [], [], [], [], [], []
    for logits_NE in router_logits:
        logits_NE = logits_NE.float()
        num_experts = logits_NE.shape[1]
        probs_NE = logits_NE.softmax(dim=-1)
        with torch.no_grad():
            chosen_NE = torch.zeros_like(probs_NE).scatter_(1, logits_NE.topk(top_k, dim=-1).indices, 1.0)
            chosen_NE = chosen_NE * weight_N[:, None]
            counts_E = chosen_NE.sum(dim=0)
            if groups is None:
                group_counts = counts_E.clone()
                group_tokens = tokens.clone()
                if world > 1:
                    dist.all_reduce(group_counts)
                    dist.all_reduce(group_tokens)
                share_NE = (group_counts / group_tokens.clamp(min=1)).expand_as(probs_NE)
            else:
                n_groups = int(groups.max()) + 1
                g_counts = torch.zeros(n_groups, num_experts, device=probs_NE.device).index_add_(
                    0, groups, chosen_NE
                )
                g_tokens = torch.zeros(n_groups, device=probs_NE.device).index_add_(0, groups, weight_N)
                share_NE = (g_counts / g_tokens.clamp(min=1)[:, None])[groups]
        balance_terms.append(num_experts * (share_NE * probs_NE * weight_N[:, None]).sum() / normaliser)
        z_N = torch.logsumexp(logits_NE, dim=-1).square()
        z_terms.append((z_N * weight_N).sum() / normaliser)
        with torch.no_grad():
            counts.append(counts_E)
            z_sums.append((z_N * weight_N).sum())
            mean_p = (probs_NE * weight_N[:, None]).sum(0) / tokens.clamp(min=1)
            balances.append(num_experts * (counts_E / tokens.clamp(min=1) * mean_p).sum())
            entropy_N = -(probs_NE * probs_NE.clamp(min=1e-12).log()).sum(-1)
            entropies.append((entropy_N * weight_N).sum())

    layers = len(router_logits)
    return RouterLosses(
        balance=world * torch.stack(balance_terms).sum() / layers,
        z_loss=world * torch.stack(z_terms).sum() / layers,
        counts_LE=torch.stack(counts),
        z_sum_L=torch.stack(z_sums),
        balance_L=torch.stack(balances),
        entropy_sum_L=torch.stack(entropies),
        tokens=tokens.detach(),
    )
