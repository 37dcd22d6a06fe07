"""Per-layer router metrics, accumulated between logging steps and reduced across ranks.

Logged every logging step, per layer: z-loss, balance loss, each expert's share of routed tokens,
the largest share over the mean share (1.0 = perfectly even), the router's entropy, and the share of
routed token-choices that would overflow an expert at capacity factors 1.0, 1.25 and 2.0 (mixtune
never drops tokens; this says what a capacity-limited MoE would have dropped). With a RoutingWatch
(training), also drift from the starting routing and collapsed experts (see routing_drift.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .router_loss import RouterLosses
from .routing_drift import RoutingWatch

# Capacity factors at which overflow is counted (GShard / Switch use 1.0-2.0).
CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def capacity_overflow(counts_LE: torch.Tensor, factors: tuple[float, ...] = CAPACITY_FACTORS) -> torch.Tensor:
    """(L, F) routed token-choices of one micro-batch over capacity, per layer and capacity factor.

    capacity = ceil(factor * tokens * k / E) per expert (DeepSpeed's rounding), where tokens * k is
    the micro-batch's number of routed token-choices, i.e. counts_LE summed over experts.
    """
    num_experts = counts_LE.shape[1]
    choices_L1 = counts_LE.sum(dim=1, keepdim=True)
    # Python-scalar factors: no host-to-device copy on the training step's path.
    over = [(counts_LE - torch.ceil(choices_L1 * f / num_experts)).clamp(min=0).sum(dim=1) for f in factors]
    return torch.stack(over, dim=1)


def overflow_key(factor: float) -> str:
    """Metric name for one capacity factor: overflow_cf1_25 (no dot, so the name reads as one key in W&B and shells)."""
    return "overflow_cf" + f"{factor:.2f}".replace(".", "_")


class RouterMetrics:
    """Sums on the device (no host sync per step); `compute()` reduces them when it is time to log."""

    def __init__(self, watch: RoutingWatch | None = None):
        self.watch = watch
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
            "overflow": capacity_overflow(losses.counts_LE.detach().float()),
        }
        if self.watch is not None:
            self.watch.observe(losses.counts_LE)
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
        overflow_LF = sums["overflow"] / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
        out = {
            f"{prefix}/z_loss": z_L.mean().item(),
            f"{prefix}/balance_loss": balance_L.mean().item(),
            f"{prefix}/max_over_mean": max_over_mean_L.max().item(),
            f"{prefix}/entropy": entropy_L.mean().item(),
        }
        for f, factor in enumerate(CAPACITY_FACTORS):
            out[f"{prefix}/{overflow_key(factor)}"] = overflow_LF[:, f].mean().item()
        # One device-to-host copy per tensor, not one per value (each .item() is a sync on GPUs).
        z, balance, max_over_mean, entropy, share, overflow = (
            t.tolist() for t in (z_L, balance_L, max_over_mean_L, entropy_L, share_LE, overflow_LF)
        )
        for layer in range(num_layers):
            p = f"{prefix}/layer{layer}"
            out[f"{p}/z_loss"] = z[layer]
            out[f"{p}/balance_loss"] = balance[layer]
            out[f"{p}/max_over_mean"] = max_over_mean[layer]
            out[f"{p}/entropy"] = entropy[layer]
            for e in range(num_experts):
                out[f"{p}/expert{e}_share"] = share[layer][e]
            for f, factor in enumerate(CAPACITY_FACTORS):
                out[f"{p}/{overflow_key(factor)}"] = overflow[layer][f]
        if self.watch is not None:
            out.update(self.watch.metrics(share_LE, prefix))
        self.reset()
        return out
