"""SIGTERM: finish the optimizer step in progress, save a checkpoint there, exit with PREEMPTED_EXIT_CODE.

Schedulers (Slurm, Kubernetes, spot and preemptible instances) send SIGTERM, then SIGKILL after a
grace period. While `trainer.train()` runs, mixtune's handler only records the request: the current
optimizer step runs to its end (a checkpoint mid-accumulation would hold half a step's gradients,
which the Trainer does not save), then every rank agrees to stop (one all-reduce per step in
multi-process runs, so ranks that got the signal at different moments stop at the same step), the
checkpoint of that step is written through the usual complete-or-ignored transaction, and the
entry point exits with PREEMPTED_EXIT_CODE without writing final outputs. Running the same command
with `training.resume_from_checkpoint=latest` continues exactly where it stopped.

A second SIGTERM ends the process at once (the checkpoint being written, if any, stays partial and
is never resumed from). Deliver the signal to the training processes: `python -m mixtune.sft`
directly, the process group, or a multi-process `accelerate launch`, whose torchrun agent forwards
it to its workers. A one-process `accelerate launch` does not forward it to its child.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers import TrainerCallback

# EX_TEMPFAIL from sysexits.h: a temporary failure, the same command may be run again. Distinct
# from 0 (finished), 1 (an error), 2 (a bad recipe) and 128 + 15 (killed by SIGTERM unhandled).
PREEMPTED_EXIT_CODE = 75

logger = logging.getLogger("mixtune.signals")


class StopOnSignal(TrainerCallback):
    """Turns a SIGTERM into "save at the end of this optimizer step, then stop"."""

    def __init__(self, any_rank: Callable[[bool], bool], signum: int = signal.SIGTERM):
        self.any_rank = any_rank
        self.signum = signum
        self.requested = False
        self.stopped_at: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop waiting for the step to end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        logger.warning(
            "received %s: finishing this optimizer step, then saving a checkpoint and exiting with %d",
            signal.Signals(signum).name,
            PREEMPTED_EXIT_CODE,
        )

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Handle the signal for the duration of the block (main thread only), then restore the old handler."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training outside the main thread: SIGTERM will not stop it at a safe point")
            yield
            return
        previous = signal.signal(self.signum, self._handle)
        try:
            yield
        finally:
            signal.signal(self.signum, previous)

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_rank(self.requested):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
