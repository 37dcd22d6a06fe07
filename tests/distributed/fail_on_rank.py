"""Launched helper: `mixtune.sft` with one rank raising after a step; the launch must end, naming it.

    accelerate launch --config_file configs/cpu_zero3.yaml --num_processes 2 \
        -m tests.distributed.fail_on_rank RANK RECIPE [key=value ...]

The real SFT entry point runs, with one extra callback that raises on rank RANK at the end of
step 1. The other ranks are by then waiting in the next step's collectives; the launcher must see
the failure, stop them, exit non-zero and say which rank failed.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from transformers import TrainerCallback

from mixtune import sft
from mixtune.train import setup


class FailOnRank(TrainerCallback):
    """Raise on one rank once a training step has finished."""

    def __init__(self, rank: int, step: int = 1):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and dist.get_rank() == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank} after step {self.step}")


def main(argv: list[str]) -> int:
    failing_rank, stage_argv = int(argv[0]), argv[1:]

    def build_run(recipe, build_datasets):
        run = setup.build_run(recipe, build_datasets)
        run.callbacks.append(FailOnRank(failing_rank))
        return run

    sft.build_run = build_run  # the entry point as users run it, plus the failing callback
    return sft.main(stage_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
