"""Grouped experts against the per-expert loop, and the router's losses against direct formulas."""

from __future__ import annotations

import pytest
import torch

from mixtune.model.experts import GroupedExperts, experts_reference
from mixtune.model.router import TopKRouter, load_balance_loss, router_z_loss


def make_experts(E=6, D=16, I=24, seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(E, D, I)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    return experts


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_grouped_equals_loop_outputs_and_grads(top_k):
    experts = make_experts()
    router = TopKRouter(16, 6, top_k)
    x = torch.randn(40, 16, requires_grad=True)
    routing = router(x)
    # Leave expert 5 idle: an expert with no tokens must cost nothing and break nothing.
    ids = routing.expert_ids.clamp(max=4)
    out = experts(x, ids, routing.weights)
    ref = experts_reference(experts, x, ids, routing.weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    grads = torch.autograd.grad(
        out.square().sum(),
        [x, experts.gate_up_proj, experts.down_proj, router.proj.weight],
        retain_graph=True,
    )
    ref_grads = torch.autograd.grad(
        ref.square().sum(), [x, experts.gate_up_proj, experts.down_proj, router.proj.weight]
    )
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert grads[1][5].abs().sum() == 0 and grads[2][5].abs().sum() == 0


def test_frozen_experts_get_no_weight_gradient():
    experts = make_experts().requires_grad_(False)
    x = torch.randn(10, 16, requires_grad=True)
    ids = torch.randint(0, 6, (10, 2))
    experts(x, ids, torch.full((10, 2), 0.5)).sum().backward()
    assert experts.gate_up_proj.grad is None and x.grad is not None


def test_router_picks_top_k_in_fp32_and_renormalises():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2).to(torch.bfloat16)
    x = torch.randn(12, 16, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.logits.dtype == torch.float32
    full = routing.logits.softmax(-1)
    top, ids = full.topk(2, dim=-1)
    assert torch.equal(ids, routing.expert_ids)
    torch.testing.assert_close(routing.weights, top / top.sum(-1, keepdim=True))


def test_balance_and_z_loss_against_direct_computation():
    torch.manual_seed(0)
    T, E, K = 30, 8, 2
    logits = torch.randn(T, E) * 2
    mask = torch.rand(T) > 0.3
    probs = logits.softmax(-1)
    kept = mask.nonzero().squeeze(1)
    # Direct: over the kept tokens only, f_e = (tokens choosing e) / tokens, P_e = mean prob.
    f = torch.zeros(E)
    for t in kept.tolist():
        for e in logits[t].topk(K).indices.tolist():
            f[e] += 1
    f /= len(kept)
    P = probs[kept].mean(0)
    torch.testing.assert_close(load_balance_loss(logits, K, mask), E * (f * P).sum())
    z = torch.stack([torch.log(torch.exp(logits[t]).sum()) ** 2 for t in kept.tolist()]).mean()
    torch.testing.assert_close(router_z_loss(logits, mask), z)
    # No mask == all-true mask; padding changes the loss.
    torch.testing.assert_close(
        load_balance_loss(logits, K), load_balance_loss(logits, K, torch.ones(T, dtype=bool))
    )
    assert not torch.isclose(load_balance_loss(logits, K), load_balance_loss(logits, K, mask))


def test_balance_loss_is_k_when_perfectly_balanced():
    # Every expert chosen equally often with uniform probabilities: f_e = K/E, P_e = 1/E.
    E, K = 4, 2
    logits = torch.zeros(8, E)
    logits[torch.arange(8), torch.arange(8) % E] = 1e-3
    logits[torch.arange(8), (torch.arange(8) + 1) % E] = 1e-3
    torch.testing.assert_close(load_balance_loss(logits, K), torch.tensor(float(K)), atol=1e-3, rtol=0)
