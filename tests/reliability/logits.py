"""`python tests/reliability/logits.py STAGE_OUTPUT_DIR OUT.safetensors`: reload an adapter in a fresh process.

Rebuilds the base model from the stage's saved recipe, loads the saved adapter onto it, and writes
the logits of a fixed prompt, so a test can compare them with the training process's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixtune.lora import load_adapter
from mixtune.train.model_loading import load_base_model, stage_model_section

IDS = torch.tensor([[1, 733, 16289, 28793, 28705, 28740, 28806, 28750, 733, 28748, 16289, 28793]])

if __name__ == "__main__":
    stage_dir, out = Path(sys.argv[1]), sys.argv[2]
    model = load_adapter(load_base_model(stage_model_section(stage_dir)), stage_dir).eval()
    with torch.no_grad():
        save_file({"logits": model(IDS).logits.contiguous()}, out)
