"""Compare training runs side by side: `python -m mixtune.compare RUN [RUN ...] [--out DIR] [--metrics ...]`.

RUN is a local directory (an `offline-run-*` directory, or a training output directory with
`wandb/offline-run-*` inside; read with no network) or a W&B path (`entity/project/run_id`, or
`entity/project` with --group / --tag). Prints the recipe keys whose values differ and each metric's
final and best value, and writes loss, DPO-margin, router and expert-load plots to --out.
See docs/router.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixtune.compare_runs import RunData, read_offline, read_online
from mixtune.compare_runs.offline import RunReadError
from mixtune.compare_runs.online import is_online_path
from mixtune.compare_runs.run import unique_labels
from mixtune.compare_runs.table import config_table, metrics_table, select_metrics, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixtune.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directory, entity/project/run_id or entity/project"
    )
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where plots and summary.json go")
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="metrics to tabulate: W&B names or globs (train/loss, 'eval/*', rewards/margins); default: losses, "
        "DPO rewards, router health",
    )
    parser.add_argument("--group", help="with entity/project: only runs in this W&B group")
    parser.add_argument("--tag", action="append", default=[], help="with entity/project: runs with this tag")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    return parser.parse_args(argv)


def load_runs(specs: list[str], group: str | None, tags: list[str]) -> list[RunData]:
    """Local directories first (a relative path can look like entity/project), then W&B paths."""
    runs: list[RunData] = []
    for spec in specs:
        if Path(spec).exists() or not is_online_path(spec):
            runs.append(read_offline(spec))
        else:
            runs += read_online(spec, group, tags)
    for run, label in zip(runs, unique_labels([r.label for r in runs]), strict=True):
        run.label = label
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.runs, args.group, args.tag)
    except RunReadError as err:
        print(f"mixtune.compare: {err}", file=sys.stderr)
        return 2
    metrics = select_metrics(runs, [m for text in args.metrics or [] for m in text.split(",") if m])
    print("runs:")
    for run in runs:
        print(f"  {run.label}: {run.source} ({len(run.history)} rows, read with {run.reader})")
    print("\nconfig differences (resolved recipes):")
    print(config_table(runs))
    print("\nmetrics:")
    print(metrics_table(runs, metrics))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary(runs, metrics), indent=2, default=str) + "\n")
    if not args.no_plots:
        from mixtune.compare_runs.plots import write_plots  # matplotlib is the `plots` extra

        files = write_plots(runs, args.out)
        print(f"\nplots in {args.out}: {', '.join(p.name for p in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
