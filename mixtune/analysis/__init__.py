"""Routing analysis in the manner of the Mixtral paper's section 5, for `python -m mixtune.analyze`.

stats.py    per-layer expert shares and consecutive-token repetition, with the random baselines
domains.py  domain files (SFT conversations or preference pairs) -> Mixtral v1 token ids
route.py    a model's top-k expert choices for every token of those sequences
report.py   the printed table, JSON and PNG outputs
"""

from mixtune.analysis.stats import LayerStats, RoutingStats, random_baselines

__all__ = ["LayerStats", "RoutingStats", "random_baselines"]
