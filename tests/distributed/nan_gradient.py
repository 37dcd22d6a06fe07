"""Launched helper: `mixtune.sft` whose step 2 has a finite loss but a NaN gradient.

    accelerate launch --config_file configs/cpu_zero3.yaml --num_processes 2 \\
        -m tests.distributed.nan_gradient RECIPE [key=value ...]

At step 2 every rank's loss gets `0 * sqrt(0 * loss)` added: zero in value, NaN in gradient
(0 times the infinite slope of sqrt at 0). Under DeepSpeed the update happens inside the engine,
so the guard must notice from the engine's gradient norm and stop the run naming step 2.
"""

from __future__ import annotations

import sys

import torch

from mixtune import sft
from mixtune.train.sft_trainer import MixtuneSFTTrainer

NAN_STEP = 2


class NanGradientAtStep2(MixtuneSFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training or self.state.global_step + 1 != NAN_STEP:
            return result
        loss = result[0] if return_outputs else result
        poisoned = loss + 0.0 * torch.sqrt(loss * 0.0)
        return (poisoned, *result[1:]) if return_outputs else poisoned


if __name__ == "__main__":
    sft.MixtuneSFTTrainer = NanGradientAtStep2  # the entry point as users run it, one trainer swapped
    sys.exit(sft.main(sys.argv[1:]))
