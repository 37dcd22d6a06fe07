"""The SFT objective: router losses against direct computations, and split invariance.

One micro-batch of 8 sequences and eight micro-batches of 1 (gradient accumulation) must give the
same loss and the same gradients.
"""

from __future__ import annotations

import pytest
import torch

from mixtune.model import MixtralForCausalLM
from mixtune.model.router import load_balance_loss, router_z_loss
from mixtune.train.objective import RouterLossConfig, sft_objective
from mixtune.train.router_loss import loss_token_mask, router_losses
from tests.conftest import tiny_config


def make_batch(n=8, T=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (n, T), generator=gen)
    lengths = torch.randint(6, T + 1, (n,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a "prompt" that carries no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, micro_batches, cfg):
    model.zero_grad()
    total_items = sum(int(loss_token_mask(b["labels"]).sum()) for b in micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss = sft_objective(
            model, batch, cfg, model.config.num_experts_per_tok, num_items_in_batch=total_items
        ).loss
        loss.backward()
        total += loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


@pytest.mark.parametrize(
    "scope,balance_coef",
    [("sequence", 1.0), ("global", 0.0)],
    ids=["lm+z+sequence-balance", "lm+z"],  # global balance: see the token-weighted test below
)
def test_one_batch_of_8_equals_8_batches_of_1(scope, balance_coef):
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config(initializer_range=0.1))
    batch = make_batch()
    # Large coefficients so a mis-scaled router term would show.
    cfg = RouterLossConfig(balance_coef=balance_coef, z_loss_coef=0.5, scope=scope)
    loss_1x8, grads_1x8 = loss_and_grads(model, [batch], cfg)
    loss_8x1, grads_8x1 = loss_and_grads(model, split(batch, [1] * 8), cfg)
    torch.testing.assert_close(loss_8x1, loss_1x8, atol=1e-5, rtol=1e-5)
    for name, grad in grads_1x8.items():
        torch.testing.assert_close(grads_8x1[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_global_balance_is_token_weighted_under_accumulation():
    """With the global scope each micro-batch's counts are its own; identical halves give the 1x8 value."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config(initializer_range=0.1))
    half = make_batch(n=4)
    doubled = {k: torch.cat([v, v]) for k, v in half.items()}
    cfg = RouterLossConfig(balance_coef=1.0, z_loss_coef=0.0, scope="global")
    loss_1x8, grads_1x8 = loss_and_grads(model, [doubled], cfg)
    loss_2x4, grads_2x4 = loss_and_grads(model, [half, half], cfg)
    torch.testing.assert_close(loss_2x4, loss_1x8, atol=1e-5, rtol=1e-5)
    for name, grad in grads_1x8.items():
        torch.testing.assert_close(grads_2x4[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_router_losses_match_per_layer_reference_on_loss_tokens():
    torch.manual_seed(1)
    model = MixtralForCausalLM(tiny_config(initializer_range=0.1))
    batch = make_batch()
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    keep = loss_token_mask(batch["labels"])
    got = router_losses(out.router_logits, keep, top_k=2, scope="global")
    mask_N = keep.reshape(-1)
    want_balance = torch.stack([load_balance_loss(lg, 2, mask_N) for lg in out.router_logits]).mean()
    want_z = torch.stack([router_z_loss(lg, mask_N) for lg in out.router_logits]).mean()
    torch.testing.assert_close(got.balance, want_balance)
    torch.testing.assert_close(got.z_loss, want_z)
    # Only tokens that carry loss count: padding and the prompt are left out.
    assert int(got.tokens) == int(keep.sum()) < batch["attention_mask"].sum()


def test_sequence_scope_counts_each_packed_example_separately():
    torch.manual_seed(2)
    logits = torch.randn(1 * 10, 4)
    keep = torch.ones(1, 10, dtype=torch.bool)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    got = router_losses((logits,), keep, top_k=1, position_ids_BT=position_ids, scope="sequence").balance
    parts = [(0, 4), (4, 7), (7, 10)]
    want = sum((b - a) * load_balance_loss(logits[a:b], 1) for a, b in parts) / 10
    torch.testing.assert_close(got, want)
