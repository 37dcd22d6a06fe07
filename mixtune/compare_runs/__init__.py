"""Reading training runs (W&B online, W&B offline files, metrics.jsonl) and comparing them side by side.

    run.py      RunData: one run's config and metric history, under W&B's metric names
    offline.py  offline run directories, read with `wandb leet inspect --json` (no network)
    online.py   runs on a W&B server, through wandb.Api
    table.py    config differences and final / best metrics as text tables
    plots.py    loss, DPO margin and router curves, expert-load heat maps (matplotlib, Agg)

The command is mixtune.compare.
"""

from mixtune.compare_runs.offline import read_offline
from mixtune.compare_runs.online import read_online
from mixtune.compare_runs.run import RunData

__all__ = ["RunData", "read_offline", "read_online"]
