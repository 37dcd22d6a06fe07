"""What `mixtune.analyze` writes: a per-domain table on the console, analysis.json and PNG plots."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .domains import Domain
from .stats import PAPER_REFERENCE, LayerStats, random_baselines


@dataclass
class DomainResult:
    """One domain's per-layer stats for the model, and for the --compare model when there is one."""

    domain: Domain
    tokens: int
    layers: list[LayerStats]
    other: list[LayerStats] | None = None


def share_tv(a: list[float], b: list[float]) -> float:
    """Total variation between two share vectors (0 = same split, 1 = disjoint)."""
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b, strict=True))


def header(model: str, other: str | None, num_experts: int, top_k: int, num_layers: int) -> str:
    first, topk = random_baselines(num_experts, top_k)
    lines = [
        f"model {model}: {num_layers} layers, {num_experts} experts, top-{top_k}"
        + (f"; deltas are this model minus {other}" if other else ""),
        f"random baseline (E={num_experts}, k={top_k}): first choice {first:.1%}, "
        f"first or second choice {topk:.1%}",
        f"yardstick: {PAPER_REFERENCE}",
    ]
    return "\n".join(lines)


def domain_table(result: DomainResult, top_k: int) -> str:
    d = result.domain
    lines = [
        f"domain {d.name}: {d.path} ({d.kind}, {len(d.sequences)} sequences, {result.tokens} tokens, "
        f"{d.skipped} rows skipped)",
    ]
    cols = f"  {'layer':>5}  {'first rep':>9}  {f'top-{top_k} rep':>9}  {'max/mean':>8}"
    if result.other is not None:
        cols += f"  {'Δ first':>8}  {f'Δ top-{top_k}':>8}  {'share TV':>8}"
    lines.append(cols + f"  top-{top_k} share % per expert")
    for layer, stats in enumerate(result.layers):
        max_over_mean = max(stats.topk_share) * len(stats.topk_share)
        row = f"  {layer:>5}  {stats.first_repeat:>9.1%}  {stats.topk_repeat:>9.1%}  {max_over_mean:>8.2f}"
        if result.other is not None:
            before = result.other[layer]
            row += (
                f"  {100 * (stats.first_repeat - before.first_repeat):>+7.1f}p"
                f"  {100 * (stats.topk_repeat - before.topk_repeat):>+7.1f}p"
                f"  {share_tv(stats.topk_share, before.topk_share):>8.3f}"
            )
        lines.append(row + "  " + " ".join(f"{100 * s:.0f}" for s in stats.topk_share))
    return "\n".join(lines)


def to_json(
    results: list[DomainResult], model: str, other: str | None, num_experts: int, top_k: int
) -> dict[str, Any]:
    first, topk = random_baselines(num_experts, top_k)
    domains = {}
    for r in results:
        entry: dict[str, Any] = {
            "file": r.domain.path,
            "kind": r.domain.kind,
            "sequences": len(r.domain.sequences),
            "tokens": r.tokens,
            "skipped_rows": r.domain.skipped,
            "layers": [dataclasses.asdict(s) for s in r.layers],
        }
        if r.other is not None:
            entry["compare_layers"] = [dataclasses.asdict(s) for s in r.other]
            entry["delta"] = [
                {
                    "first_repeat": a.first_repeat - b.first_repeat,
                    "topk_repeat": a.topk_repeat - b.topk_repeat,
                    "topk_share": [x - y for x, y in zip(a.topk_share, b.topk_share, strict=True)],
                    "topk_share_tv": share_tv(a.topk_share, b.topk_share),
                }
                for a, b in zip(r.layers, r.other, strict=True)
            ]
        domains[r.domain.name] = entry
    return {
        "model": model,
        "compare": other,
        "num_experts": num_experts,
        "top_k": top_k,
        "random_baseline": {"first_repeat": first, "topk_repeat": topk},
        "reference": PAPER_REFERENCE,
        "domains": domains,
    }


def write_plots(results: list[DomainResult], out: Path, num_experts: int, top_k: int) -> list[Path]:
    """repetition.png (rates per layer against the baselines) and shares.png (layers x experts per domain)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def integer_axes(ax) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))

    first, topk = random_baselines(num_experts, top_k)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    for ax, key, baseline, title in (
        (axes[0][0], "first_repeat", first, "first choice repeated"),
        (axes[0][1], "topk_repeat", topk, f"top-{top_k} sets share an expert"),
    ):
        for i, r in enumerate(results):
            layers = range(len(r.layers))
            ax.plot(
                layers, [getattr(s, key) for s in r.layers], "-o", color=f"C{i % 10}", label=r.domain.name
            )
            if r.other is not None:
                ax.plot(
                    layers,
                    [getattr(s, key) for s in r.other],
                    ":",
                    color=f"C{i % 10}",
                    label=f"{r.domain.name} (compare)",
                )
        ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label=f"random {baseline:.1%}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share of consecutive token pairs")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    repetition = out / "repetition.png"
    fig.savefig(repetition, dpi=100)
    plt.close(fig)

    rows = 2 if any(r.other is not None for r in results) else 1
    fig, axes = plt.subplots(rows, len(results), figsize=(1 + 3.5 * len(results), 3 * rows), squeeze=False)
    for col, r in enumerate(results):
        ax = axes[0][col]
        image = ax.imshow([s.topk_share for s in r.layers], cmap="viridis", aspect="auto", vmin=0)
        fig.colorbar(image, ax=ax)
        ax.set_title(f"{r.domain.name}: top-{top_k} share")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        integer_axes(ax)
        if rows == 2 and r.other is not None:
            ax = axes[1][col]
            delta = [
                [x - y for x, y in zip(a.topk_share, b.topk_share, strict=True)]
                for a, b in zip(r.layers, r.other, strict=True)
            ]
            limit = max(1e-6, max(abs(v) for row in delta for v in row))
            image = ax.imshow(delta, cmap="RdBu_r", aspect="auto", vmin=-limit, vmax=limit)
            fig.colorbar(image, ax=ax)
            ax.set_title(f"{r.domain.name}: share change vs compare")
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            integer_axes(ax)
    fig.tight_layout()
    shares = out / "shares.png"
    fig.savefig(shares, dpi=100)
    plt.close(fig)
    return [repetition, shares]
