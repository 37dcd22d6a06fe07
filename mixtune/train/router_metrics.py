"""Per-layer router metrics, accumulated between logging steps and reduced across ranks.

Logged every logging step, per layer: z-loss, balance loss, each expert's share of routed tokens,
the largest share over the mean share (1.0 = perfectly even), and the router's entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .router_loss import RouterLosses


class RouterMetrics:
    """Sums on the device (no host sync per step); `compute()` reduces them when it is time to log."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._micro_batches = 0

    def add(self, losses: RouterLosses) -> None:
        parts = {
            "counts": losses.counts_LE,
            "z": losses.z_sum_L,
            "balance": losses.balance_L,
            "entropy": losses.entropy_sum_L,
            "tokens": losses.tokens.reshape(1),
        }
        for key, value in parts.items():
            value = value.detach().float()
            self._sums[key] = value if key not in self._sums else self._sums[key] + value
        self._micro_batches += 1

    def compute(self, prefix: str = "router") -> dict[str, float]:
        """Reduce across ranks (every rank must call this together) and return flat metrics."""
        if not self._sums:
            return {}
        sums = {k: v.clone() for k, v in self._sums.items()}
        micro_batches = torch.tensor([float(self._micro_batches)], device=sums["tokens"].device)
        if dist.is_available() and dist.is_initialized():
            for value in (*sums.values(), micro_batches):
                dist.all_reduce(value)
        tokens = sums["tokens"].clamp(min=1)
        counts_LE = sums["counts"]
        share_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
        num_layers, num_experts = share_LE.shape
        z_L = sums["z"] / tokens
        balance_L = sums["balance"] / micro_batches
        entropy_L = sums["entropy"] / tokens
        max_over_mean_L = share_LE.max(dim=1).values * num_experts
        out = {
            f"{prefix}/z_loss": z_L.mean().item(),
            f"{prefix}/balance_loss": balance_L.mean().item(),
            f"{prefix}/max_over_mean": max_over_mean_L.max().item(),
            f"{prefix}/entropy": entropy_L.mean().item(),
        }
        for layer in range(num_layers):
            p = f"{prefix}/layer{layer}"
            out[f"{p}/z_loss"] = z_L[layer].item()
            out[f"{p}/balance_loss"] = balance_L[layer].item()
            out[f"{p}/max_over_mean"] = max_over_mean_L[layer].item()
            out[f"{p}/entropy"] = entropy_L[layer].item()
            for e in range(num_experts):
                out[f"{p}/expert{e}_share"] = share_LE[layer, e].item()
        self.reset()
        return out
