"""Record the router logits of a model's forward passes, from outside the model.

TRL's DPOTrainer runs the policy and reference forwards inside its own loss code and keeps only
log-probabilities, so the router logits mixtune's losses need are collected with forward hooks on
the routers while a recording is open (hooks are applied after the model is built, as the house
style wants; the model code knows nothing about it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mixtune.model.router import TopKRouter


class RoutingRecorder:
    """`with recorder.recording() as passes:` -> passes[i] is the i-th forward's per-layer (N, E) logits."""

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        if not self.routers:
            raise ValueError("no mixtune routers found in the model")
        self._passes: list[list[torch.Tensor]] | None = None
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self._passes is None:
            return
        # Layer 0 opens a new forward pass; layers run in order.
        if module is self.routers[0]:
            self._passes.append([])
        self._passes[-1].append(output.logits)

    @contextmanager
    def recording(self) -> Iterator[list[list[torch.Tensor]]]:
        self._passes = []
        try:
            yield self._passes
        finally:
            self._passes = None
