"""Routing over a whole run: drift from the starting model's routing, and experts that fade out.

Drift. The reference is each layer's per-expert share of the routed tokens in the forward passes of
the first optimizer step. Those passes run on the starting weights (nothing changes them before
the step ends), on the same kind of tokens the run trains on, so they are a pass of the starting
model at train start that costs no extra forward and no extra collective. Two alternatives were
weighed: the first logging window already contains `logging_steps` updates, so it would hide
early drift; a separate no-grad pass over held-back batches would cost forwards (and, under ZeRO-3,
gathers) for the same information. The reference is saved in every checkpoint
(`routing_reference.json`) and read back on resume, so a resumed run keeps measuring drift from the
original start. Per layer, against the current logging window's shares:
- `drift_tv`: total variation 0.5 * sum_e |share_e - ref_e| (0 = same split, 1 = disjoint);
- `drift_kl`: KL(current || reference) in nats, with shares floored at KL_FLOOR so an expert the
  reference never used gives a large, finite value.
Both have a sampling floor: two samples of N routed token-choices each from the same, evenly
loaded router differ by about 0.6 * sqrt(E / N) in TV (0.025 for E=8, N=4096), so small windows
never read exactly 0.

Collapse. An expert whose share of a layer's routed tokens stays under `collapse_share` times the
mean share (1/E) for `collapse_patience` logging steps in a row is reported once on the console
(logger "mixtune.router") and counted in `collapsed_experts` for as long as it stays under.
Defaults are the constants below; `mixtune.train.setup.router_watch_config` reads recipe overrides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

COLLAPSE_SHARE = 0.25  # x the mean share 1/E: 3.1% of a layer's routed tokens with 8 experts
COLLAPSE_PATIENCE = 3  # logging steps in a row under the threshold before it counts as collapse
KL_FLOOR = 1e-6  # smallest share KL sees, so an unused expert gives a finite (large) value
REFERENCE_FILE = "routing_reference.json"

logger = logging.getLogger("mixtune.router")


@dataclass
class WatchConfig:
    """Collapse thresholds (see the module docstring)."""

    collapse_share: float = COLLAPSE_SHARE
    collapse_patience: int = COLLAPSE_PATIENCE


def share_drift(share_LE: torch.Tensor, ref_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) total variation and (L,) KL(share || ref) between two (L, E) share tensors (rows sum to 1)."""
    tv_L = 0.5 * (share_LE - ref_LE).abs().sum(dim=1)
    p_LE = share_LE.clamp(min=KL_FLOOR)
    p_LE = p_LE / p_LE.sum(dim=1, keepdim=True)
    q_LE = ref_LE.clamp(min=KL_FLOOR)
    q_LE = q_LE / q_LE.sum(dim=1, keepdim=True)
    kl_L = (p_LE * (p_LE / q_LE).log()).sum(dim=1)
    return tv_L, kl_L


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RoutingWatch:
    """Holds the reference shares and the collapse counters of one run's training metrics."""

    def __init__(self, config: WatchConfig | None = None):
        self.config = config or WatchConfig()
        self.reference_LE: torch.Tensor | None = None
        self.capturing = True
        self._pending_LE: torch.Tensor | None = None
        self._below_LE: torch.Tensor | None = None

    def observe(self, counts_LE: torch.Tensor) -> None:
        """Add one training micro-batch's (L, E) expert counts to the reference while it is open."""
        if self.capturing:
            counts_LE = counts_LE.detach().float()
            self._pending_LE = counts_LE if self._pending_LE is None else self._pending_LE + counts_LE

    def close_reference(self) -> None:
        """End of the first optimizer step: sum the counts over ranks (all ranks call this together)."""
        self.capturing = False
        if self._pending_LE is None:
            return
        counts_LE = self._pending_LE.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_LE)
        self.reference_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp(min=1)
        self._pending_LE = None

    def metrics(self, share_LE: torch.Tensor, prefix: str) -> dict[str, float]:
        """Drift and collapse metrics for one logging window's (L, E) shares (identical on every rank)."""
        out: dict[str, float] = {}
        num_experts = share_LE.shape[1]
        if self.reference_LE is not None and self.reference_LE.shape == share_LE.shape:
            tv_L, kl_L = share_drift(share_LE, self.reference_LE.to(share_LE.device))
            out[f"{prefix}/drift_tv"] = tv_L.mean().item()
            out[f"{prefix}/drift_kl"] = kl_L.mean().item()
            for layer, (tv, kl) in enumerate(zip(tv_L.tolist(), kl_L.tolist(), strict=True)):
                out[f"{prefix}/layer{layer}/drift_tv"] = tv
                out[f"{prefix}/layer{layer}/drift_kl"] = kl
        below_LE = share_LE < self.config.collapse_share / num_experts
        if self._below_LE is None or self._below_LE.shape != below_LE.shape:
            self._below_LE = torch.zeros_like(below_LE, dtype=torch.long)
        self._below_LE = (self._below_LE + 1) * below_LE
        collapsed_LE = self._below_LE >= self.config.collapse_patience
        out[f"{prefix}/collapsed_experts"] = float(collapsed_LE.sum().item())
        for layer, count in enumerate(collapsed_LE.sum(dim=1).tolist()):
            out[f"{prefix}/layer{layer}/collapsed_experts"] = float(count)
        if _is_main():
            for layer, expert in (self._below_LE == self.config.collapse_patience).nonzero().tolist():
                logger.warning(
                    "router: layer %d expert %d has had under %g x the mean share for %d logging steps in a "
                    "row (now %.2f%%, mean %.2f%%): it may be collapsing (see docs/router.md)",
                    layer,
                    expert,
                    self.config.collapse_share,
                    self.config.collapse_patience,
                    100 * share_LE[layer, expert].item(),
                    100 / num_experts,
                )
        return out

    def save(self, path: Path) -> None:
        if self.reference_LE is not None:
            path.write_text(json.dumps({"reference_shares": self.reference_LE.tolist()}) + "\n")

    def load(self, path: Path) -> None:
        self.reference_LE = torch.tensor(json.loads(path.read_text())["reference_shares"])
        self.capturing = False
        self._pending_LE = None


class RoutingWatchCallback(TrainerCallback):
    """Closes the reference after the first optimizer step, saves it with checkpoints, reloads it on resume."""

    def __init__(self, watch: RoutingWatch):
        self.watch = watch

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        found = next((c / REFERENCE_FILE for c in candidates if (c / REFERENCE_FILE).is_file()), None)
        if found is not None:
            self.watch.load(found)
        elif _is_main():
            logger.warning(
                "router: resumed at step %d without %s; routing drift is measured from this step",
                state.global_step,
                REFERENCE_FILE,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.watch.capturing:
            self.watch.close_reference()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            self.watch.save(checkpoint / REFERENCE_FILE)
