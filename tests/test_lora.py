"""LoRA on attention and experts: PEFT life cycle (init, save/reload, merge, disable) and the router policy."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mixtune.lora import apply_lora, load_adapter, make_lora_config
from mixtune.model import MixtralForCausalLM
from mixtune.model.grouped import plan_routing
from tests.conftest import tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


def base_model(seed=0):
    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_config()).eval()


def ids():
    torch.manual_seed(7)
    return torch.randint(3, 500, (2, 10))


def test_fresh_adapter_equals_base():
    model = base_model()
    x = ids()
    before = model(x).logits
    peft_model = apply_lora(model, make_lora_config(ALL, r=4, alpha=8))
    torch.testing.assert_close(peft_model(x).logits, before, atol=0, rtol=0)


def test_adapter_changes_output_and_disable_restores_base():
    model = base_model()
    x = ids()
    before = model(x).logits
    peft_model = apply_lora(model, make_lora_config(ALL, r=4, alpha=8, init_lora_weights=False))
    assert (peft_model(x).logits - before).abs().max() > 1e-3
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(x).logits, before, atol=0, rtol=0)


def test_only_adapter_weights_train_and_frozen_experts_get_no_gradient():
    peft_model = apply_lora(base_model(), make_lora_config(ALL, r=4, alpha=8, init_lora_weights=False))
    peft_model.train()
    x = ids()
    peft_model(x, labels=x).loss.backward()
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_save_reload_gives_identical_logits(tmp_path):
    peft_model = apply_lora(base_model(), make_lora_config(ALL, r=4, alpha=8, init_lora_weights=False))
    x = ids()
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(base_model(), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(x).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("policy", ["frozen", "lora", "full"])
def test_merge_is_exact_and_router_policy_is_respected(policy):
    peft_model = apply_lora(
        base_model(), make_lora_config(ALL, r=4, alpha=8, router_policy=policy, init_lora_weights=False)
    )
    router_trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".router." in n]
    assert bool(router_trainable) == (policy != "frozen")
    if policy == "full":
        with torch.no_grad():  # make the trained router copy differ from the original
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(0.3)
    x = ids()
    expected = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, MixtralForCausalLM)
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_dropout_on_experts_is_active_only_in_training():
    peft_model = apply_lora(
        base_model(), make_lora_config(["w1", "w2", "w3"], r=4, alpha=8, dropout=0.5, init_lora_weights=False)
    )
    x = ids()
    peft_model.eval()
    assert torch.equal(peft_model(x).logits, peft_model(x).logits)
    peft_model.train()
    torch.manual_seed(0)
    a = peft_model(x).logits
    torch.manual_seed(1)
    assert not torch.equal(a, peft_model(x).logits)


def test_expert_lora_costs_only_its_thin_products():
    """Never W + BA: the LoRA term of one projection costs 2*N*r*(in+out) FLOPs, not 2*N*in*out."""
    model = apply_lora(base_model(), make_lora_config(["w2"], r=4, alpha=8, init_lora_weights=False))
    lora_layer = model.base_model.model.model.layers[0].mlp.experts.w2_proj
    N, E, inter, hidden = 40, 4, 96, 64
    h = torch.randn(N, inter)
    plan = plan_routing(torch.randint(0, E, (N, 1)), torch.ones(N, 1), E)
    with FlopCounterMode(display=False) as counter:
        lora_layer(h, plan)
    assert counter.get_total_flops() == 2 * N * 4 * (inter + hidden)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        make_lora_config(["q_proj", "gate"], r=4, alpha=8)
