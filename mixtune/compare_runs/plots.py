"""PNG plots of several runs: loss curves, DPO margins, router health, and each run's expert load."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: compare runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402

from .run import RunData  # noqa: E402

ROUTER_CURVES = (
    "train/router/balance_loss",
    "train/router/max_over_mean",
    "train/router/drift_tv",
    "train/router/overflow_cf1_25",
)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _curves(runs: list[RunData], panels: list[tuple[str, list[str]]], path: Path) -> Path | None:
    """One panel per (title, metrics); one line per run and metric (eval dashed). None if nothing to draw."""
    panels = [(t, ms) for t, ms in panels if any(run.series(m)[1] for run in runs for m in ms)]
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, metrics) in zip(axes.flat, panels, strict=False):
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for metric in metrics:
                steps, values = run.series(metric)
                if values:
                    style = "--o" if metric.startswith("eval/") else "-"
                    ax.plot(steps, values, style, color=color, markersize=3, label=f"{run.label} {metric}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def expert_load(run: RunData, path: Path) -> Path | None:
    """Heat map of the run's final per-expert shares (layers x experts); None without router metrics."""
    shares = run.final_shares()
    if shares is None:
        return None
    layers, experts = len(shares), len(shares[0])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * experts, 1 + 0.4 * layers))
    top = max(max(row) for row in shares)
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0, vmax=top)
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    if layers * experts <= 256:  # numbers stay readable up to 32 layers x 8 experts
        for layer in range(layers):
            for e in range(experts):
                value = shares[layer][e]
                color = "k" if value > 0.6 * top else "w"  # dark text on viridis' bright end
                ax.text(e, layer, f"{100 * value:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_title(f"{run.label}: final expert load (%), mean {100 / experts:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(runs: list[RunData], out: Path) -> list[Path]:
    """Every plot that the runs have data for, written under `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _curves(runs, [("loss", ["train/loss", "eval/loss"])], out / "loss.png"),
        _curves(
            runs,
            [
                ("DPO reward margin", ["train/rewards/margins", "eval/rewards/margins"]),
                ("DPO reward accuracy", ["train/rewards/accuracies", "eval/rewards/accuracies"]),
            ],
            out / "dpo_margins.png",
        ),
        _curves(runs, [(m.removeprefix("train/router/"), [m]) for m in ROUTER_CURVES], out / "router.png"),
    ]
    written += [expert_load(run, out / f"expert_load_{_safe(run.label)}.png") for run in runs]
    return [p for p in written if p is not None]
