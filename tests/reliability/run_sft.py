"""`python tests/reliability/run_sft.py RECIPE [key=value ...]`: mixtune.sft with one fault injected.

For tests that need a real process to kill or signal. The fault comes from the environment, so the
command line stays the user's; `MIXTUNE_TEST_READY` names a file touched when the fault fires:
- MIXTUNE_TEST_HANG_IN_SAVE=N: while checkpoint-N is being written (model and optimizer files
  written, RNG state, trainer state and COMPLETE not yet), touch the file and sleep, so the test
  can SIGKILL the process at that exact point;
- MIXTUNE_TEST_SIGTERM_AT=N: send this process SIGTERM after the first micro-batch of optimizer
  step N, i.e. in the middle of gradient accumulation;
- MIXTUNE_TEST_NAN_ON_RANK0_AT=N: the NaN guard sees a NaN loss in step N on rank 0 only (the
  other ranks' losses are finite), to show that every rank stops together.
Exits with mixtune.sft's exit code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from mixtune import sft
from mixtune.train import trainer_base


def _ready() -> None:
    Path(os.environ["MIXTUNE_TEST_READY"]).touch()


def hang_in_save(step: int) -> None:
    save_rng = Trainer._save_rng_state

    def hanging(self, output_dir):
        if self.state.global_step == step:
            _ready()
            time.sleep(600)  # the test kills us here
        return save_rng(self, output_dir)

    Trainer._save_rng_state = hanging


class SigtermMidStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_substep_end(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:  # global_step counts finished optimizer steps
            _ready()
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm_at(step: int) -> None:
    init = trainer_base.MixtuneTrainerMixin.__init__

    def with_callback(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(SigtermMidStep(step))

    trainer_base.MixtuneTrainerMixin.__init__ = with_callback


def nan_on_rank0_at(step: int) -> None:
    guard_loss = trainer_base.MixtuneTrainerMixin.guard_loss

    def poisoned(self, loss):
        if self.state.global_step + 1 == step and self.args.process_index == 0:
            loss = loss * float("nan")
        return guard_loss(self, loss)

    trainer_base.MixtuneTrainerMixin.guard_loss = poisoned


if __name__ == "__main__":
    if "MIXTUNE_TEST_HANG_IN_SAVE" in os.environ:
        hang_in_save(int(os.environ["MIXTUNE_TEST_HANG_IN_SAVE"]))
    if "MIXTUNE_TEST_SIGTERM_AT" in os.environ:
        sigterm_at(int(os.environ["MIXTUNE_TEST_SIGTERM_AT"]))
    if "MIXTUNE_TEST_NAN_ON_RANK0_AT" in os.environ:
        nan_on_rank0_at(int(os.environ["MIXTUNE_TEST_NAN_ON_RANK0_AT"]))
    sys.exit(sft.main(sys.argv[1:]))
