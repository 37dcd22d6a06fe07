"""Router metrics beyond balance: capacity overflow, drift from the starting routing, collapse warnings."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mixtune.train.router_loss import RouterLosses
from mixtune.train.router_metrics import CAPACITY_FACTORS, RouterMetrics, capacity_overflow
from mixtune.train.routing_drift import (
    REFERENCE_FILE,
    RoutingWatch,
    RoutingWatchCallback,
    WatchConfig,
    share_drift,
)


def losses(counts_LE: list[list[float]], top_k: int = 2) -> RouterLosses:
    """A micro-batch's router stats with the given expert counts (other fields are placeholders)."""
    counts = torch.tensor(counts_LE)
    L = counts.shape[0]
    return RouterLosses(
        balance=torch.tensor(0.0),
        z_loss=torch.tensor(0.0),
        counts_LE=counts,
        z_sum_L=torch.zeros(L),
        balance_L=torch.zeros(L),
        entropy_sum_L=torch.zeros(L),
        tokens=counts.sum(1)[0] / top_k,
    )


def test_capacity_overflow_counts_choices_over_ceil_capacity():
    # 4 tokens, k=2 -> 8 choices over E=4: capacity 2 (cf 1.0), ceil(2.5)=3 (1.25), 4 (2.0).
    over_LF = capacity_overflow(torch.tensor([[6.0, 2.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert over_LF.tolist() == [[4.0, 3.0, 2.0], [0.0, 0.0, 0.0]]


def test_overflow_is_counted_per_micro_batch_then_pooled():
    metrics = RouterMetrics()
    metrics.add(losses([[6.0, 2.0, 0.0, 0.0]]))  # 4 over at cf 1.0
    metrics.add(losses([[2.0, 2.0, 2.0, 2.0]]))  # none over, although pooled counts would overflow less
    out = metrics.compute()
    assert out["router/layer0/overflow_cf1_00"] == pytest.approx(4 / 16)
    assert out["router/overflow_cf2_00"] == pytest.approx(2 / 16)
    assert len(CAPACITY_FACTORS) == 3 and "router/layer0/drift_tv" not in out  # no watch, no drift


def test_share_drift_bounds():
    same = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    tv, kl = share_drift(same, same)
    assert tv.item() == 0 and kl.item() == pytest.approx(0, abs=1e-6)
    tv, kl = share_drift(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), same)
    assert tv.item() == 1 and 10 < kl.item() < 20  # disjoint: finite thanks to the floor


def test_drift_is_measured_from_the_first_optimizer_step():
    watch = RoutingWatch()
    metrics = RouterMetrics(watch)
    metrics.add(losses([[4.0, 4.0, 0.0, 0.0]]))  # step 1, micro-batch 1
    metrics.add(losses([[0.0, 0.0, 4.0, 4.0]]))  # step 1, micro-batch 2
    watch.close_reference()  # on_step_end of step 1
    assert watch.reference_LE.tolist() == [[0.25, 0.25, 0.25, 0.25]]
    assert metrics.compute()["router/layer0/drift_tv"] == 0.0  # window == step 1
    metrics.add(losses([[8.0, 0.0, 0.0, 0.0]]))  # later steps no longer touch the reference
    out = metrics.compute()
    assert out["router/layer0/drift_tv"] == pytest.approx(0.75)
    assert out["router/drift_kl"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-4)


def test_collapse_is_warned_once_after_patience_and_counted_while_it_lasts(caplog):
    watch = RoutingWatch(WatchConfig(collapse_share=0.25, collapse_patience=2))
    low = torch.tensor([[0.33, 0.33, 0.33, 0.01]])  # expert 3 under 0.25 * 0.25
    even = torch.full((1, 4), 0.25)
    with caplog.at_level(logging.WARNING, logger="mixtune.router"):
        counts = [watch.metrics(s, "router")["router/collapsed_experts"] for s in (low, low, low, even, low)]
    assert counts == [0.0, 1.0, 1.0, 0.0, 0.0]
    warnings = [r for r in caplog.records if "layer 0 expert 3" in r.getMessage()]
    assert len(warnings) == 1


def test_reference_survives_a_resume(tmp_path):
    watch = RoutingWatch()
    watch.observe(torch.tensor([[3.0, 1.0]]))
    callback = RoutingWatchCallback(watch)
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    callback.on_step_end(args, SimpleNamespace(global_step=1), None)
    (tmp_path / "checkpoint-1").mkdir()
    callback.on_save(args, SimpleNamespace(global_step=1, is_world_process_zero=True), None)
    assert (tmp_path / "checkpoint-1" / REFERENCE_FILE).is_file()

    resumed = RoutingWatch()
    RoutingWatchCallback(resumed).on_train_begin(args, SimpleNamespace(global_step=1), None)
    assert not resumed.capturing and resumed.reference_LE.tolist() == [[0.75, 0.25]]
