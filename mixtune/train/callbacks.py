"""What a run reports while it trains: a compact console view and a JSONL file of every log."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

_LAYER_KEY = re.compile(r"^(eval_)?router/layer(\d+)/(.+)$")


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train and eval, router metrics included) to a JSONL file, main process only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_log(logs: dict) -> str:
    """One line of headline numbers, then one line per layer of router health."""
    headline = {k: v for k, v in logs.items() if not _LAYER_KEY.match(k) and k != "total_flos"}
    lines = ["  ".join(f"{k}={_fmt(v)}" for k, v in headline.items())]
    layers: dict[tuple[str, int], dict[str, float]] = {}
    for key, value in logs.items():
        if match := _LAYER_KEY.match(key):
            layers.setdefault((match.group(1) or "", int(match.group(2))), {})[match.group(3)] = value
    for (prefix, layer), stats in sorted(layers.items()):
        experts = sorted(
            (k for k in stats if k.startswith("expert")), key=lambda k: int(k[len("expert") : -len("_share")])
        )
        shares = [stats[k] for k in experts]
        lines.append(
            f"  {prefix}router layer {layer:>2}: balance {stats['balance_loss']:.3f}  z {stats['z_loss']:.3f}  "
            f"max/mean {stats['max_over_mean']:.2f}  entropy {stats['entropy']:.3f}  "
            f"shares % {' '.join(f'{100 * s:.0f}' for s in shares)}"
        )
    return "\n".join(lines)


class ConsoleProgressCallback(ProgressCallback):
    """The usual progress bar, with logs printed compactly instead of as one long dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            text = format_log(logs)
            if self.training_bar is not None:
                self.training_bar.write(text)
            else:
                print(text, flush=True)
