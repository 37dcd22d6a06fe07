"""Run a model over token sequences and collect every token's top-k experts, per layer."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mixtune.inference import base_config

from .stats import RoutingStats


@torch.no_grad()
def expert_choices(
    model, sequences: list[list[int]], top_k: int, batch_size: int = 8
) -> Iterator[torch.Tensor]:
    """Yield one (L, T, K) tensor of expert ids (best first) per sequence, in the order given.

    Sequences are right-padded into batches; padding comes after every real token, so causal
    attention leaves the real tokens' routing unchanged, and padded positions are cut off.
    """
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        ids_BT = torch.zeros(len(batch), width, dtype=torch.long)
        mask_BT = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids_BT[row, : len(seq)] = torch.tensor(seq)
            mask_BT[row, : len(seq)] = 1
        # logits_to_keep=1: the routing is all that is needed, not a (B, T, V) vocabulary projection.
        out = model(
            input_ids=ids_BT.to(device),
            attention_mask=mask_BT.to(device),
            output_router_logits=True,
            logits_to_keep=1,
        )
        # Ties (an untrained router's equal logits) are broken by torch.topk, as the router does.
        ids_LBTK = torch.stack([logits.topk(top_k, dim=-1).indices for logits in out.router_logits])
        ids_LBTK = ids_LBTK.view(len(out.router_logits), len(batch), width, top_k).cpu()
        for row, seq in enumerate(batch):
            yield ids_LBTK[:, row, : len(seq)]


def routing_stats(model, sequences: list[list[int]], batch_size: int = 8) -> RoutingStats:
    """RoutingStats of a (plain or adapter-wrapped) mixtune Mixtral over the sequences."""
    config = base_config(model)
    stats = RoutingStats(config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok)
    for ids_LTK in expert_choices(model, sequences, config.num_experts_per_tok, batch_size):
        stats.add(ids_LTK)
    return stats
