"""NaN/Inf guard: a non-finite loss or gradient never reaches the optimizer.

Per optimizer step, the guard notes each micro-batch's loss (on the device, no host sync) and the
samples it came from (the datasets' `where` column, "file:line"). Just before `optimizer.step()` it
checks the losses and every gradient the optimizer would apply, agrees on the verdict with every
rank (one all-reduce), and then, as `reliability.on_nonfinite` says:
- `stop`: raises NonFiniteError naming the step, the micro-batch and its samples;
- `skip`: sets every gradient to None, so AdamW leaves the parameters and its moments and step
  counts untouched, and counts the step; more than `max_nonfinite_skips` skips stop the run.
  The step still counts as a step: global_step and the LR schedule advance past it (the scheduler
  is not told about the skip), so step numbers and the schedule stay aligned with the data.

Under DeepSpeed the engine applies the update inside backward, before any pre-step hook, so there
the loss is checked before backward instead (`check_loss_now`), all ranks agreeing, and a
non-finite gradient behind a finite loss is read from the engine's gradient norm after its step
(`after_engine_step`): ZeRO-3 (DeepSpeed 0.19) discards an update whose norm is NaN or Inf itself,
and the guard stops the run there. `skip` is refused under DeepSpeed (`refuse_unsupported`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mixtune.recipe.schema import RecipeError


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN or Inf: the message names the step and the samples."""


def refuse_unsupported(policy: str, deepspeed: bool, source: object = None) -> None:
    """`skip` needs the gradients before the update, which DeepSpeed's engine does not expose."""
    if policy == "skip" and deepspeed:
        raise RecipeError(
            f"{source}: reliability.on_nonfinite: skip is not supported under DeepSpeed (its engine applies "
            "the update inside backward, before mixtune can drop it); use on_nonfinite: stop, which DeepSpeed "
            "runs supports by checking the loss before backward"
        )


def _samples_text(samples: list[str] | None) -> str:
    if samples is None:
        return "samples unknown (packed rows carry no provenance)"
    shown = ", ".join(samples[:8]) + (f", ... ({len(samples)} in all)" if len(samples) > 8 else "")
    return f"samples {shown}"


@dataclass
class NonFiniteGuard:
    """One per trainer. `any_rank(flag)` reduces a local boolean over all ranks (True if any)."""

    policy: str = "stop"
    max_skips: int = 10
    any_rank: Callable[[torch.Tensor], torch.Tensor] = lambda flag: flag
    gather: Callable[[list], list] = lambda items: items
    rank_label: str = ""  # "rank 1 " in multi-process runs, so a message says where each sample was
    skipped: list[int] = field(default_factory=list)  # steps skipped, over the whole run (resume included)
    _losses: list[torch.Tensor] = field(default_factory=list)
    _samples: list[list[str] | None] = field(default_factory=list)

    def observe(self, loss: torch.Tensor, samples: list[str] | None) -> None:
        """Note one training micro-batch's loss and samples."""
        self._losses.append(loss.detach().reshape(()))
        self._samples.append(samples)

    def check_loss_now(self, loss: torch.Tensor, samples: list[str] | None, step: int) -> None:
        """Before backward (DeepSpeed): stop now on a non-finite loss, all ranks agreeing."""
        self._samples.append(samples)
        bad = self.any_rank(~torch.isfinite(loss.detach()).reshape(1))
        if bool(bad.item()):
            self._stop(step, "loss", [(len(self._samples) - 1, samples, not torch.isfinite(loss).item())])

    def after_engine_step(self, grad_norm: float | None, step: int) -> None:
        """After DeepSpeed's optimizer step: stop on a non-finite gradient norm (the same on every
        rank: the engine all-reduces it), naming the step's micro-batches."""
        samples, self._samples = self._samples, []
        if grad_norm is None or math.isfinite(float(grad_norm)):
            return
        self._stop(step, "gradient", [(i, s, False) for i, s in enumerate(samples)])

    def before_optimizer_step(self, params: Iterable[torch.nn.Parameter], step: int) -> bool:
        """Check the step's losses and gradients; True when the update was dropped (skip policy)."""
        params = [p for p in params if p.grad is not None]
        losses_bad = [~torch.isfinite(loss) for loss in self._losses]
        # The max-norm propagates NaN and Inf and, unlike the 2-norm, cannot overflow on finite
        # values; foreach computes it without a copy of each gradient.
        maxima = torch._foreach_norm([p.grad.detach() for p in params], ord=float("inf")) if params else []
        checks = [*losses_bad, *(~torch.isfinite(m.float()) for m in maxima)]
        local = torch.stack(checks).any().reshape(1) if checks else torch.zeros(1, dtype=torch.bool)
        verdict = self.any_rank(local)
        samples, self._losses, self._samples = self._samples, [], []
        if not bool(verdict.item()):
            return False
        bad_batches = [
            (i, s, bool(bad.item())) for i, (s, bad) in enumerate(zip(samples, losses_bad, strict=True))
        ]
        what = "loss" if any(bad for _, _, bad in bad_batches) else "gradient"
        if self.policy == "stop":
            self._stop(step, what, bad_batches)
        for p in params:
            p.grad = None  # AdamW skips parameters without a gradient: no update, no moment change
        self.skipped.append(step)
        if len(self.skipped) > self.max_skips:
            raise NonFiniteError(
                f"step {step}: non-finite {what}; {len(self.skipped)} steps skipped so far (steps "
                f"{', '.join(map(str, self.skipped[-10:]))}), over reliability.max_nonfinite_skips "
                f"{self.max_skips}"
            )
        return True

    def _stop(self, step: int, what: str, batches: list[tuple[int, list[str] | None, bool]]) -> None:
        """Raise on every rank, naming the micro-batches whose loss was bad (or all, for a gradient)."""
        named = [b for b in batches if b[2]] or batches
        lines = self.gather(
            [f"{self.rank_label}micro-batch {i + 1}: {_samples_text(samples)}" for i, samples, _ in named]
        )
        raise NonFiniteError(
            f"step {step}: non-finite {what} (NaN or Inf); the update was not applied. "
            + "; ".join(lines)
            + " (reliability.on_nonfinite: stop; `skip` counts and skips such steps instead)"
        )
