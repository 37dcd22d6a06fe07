"""The three MoE-layer implementations the block benchmarks compare, built on identical weights.

- mixtune's MoEBlock (grouped experts, LoRA inside the grouped product);
- transformers 5's MixtralSparseMoeBlock (its fastest experts implementation), with PEFT's LoRA on
  the fused expert parameters (`target_parameters`), the way users run it today;
- a dense SwiGLU FFN of width K*n: the same active FLOPs per token, the physical floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import MixtralConfig as HFConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from mixtune.lora import make_lora_config
from mixtune.model.experts import GroupedExperts
from mixtune.model.moe import MoEBlock
from mixtune.model.router import TopKRouter


class MoEOnly(nn.Module):
    """mixtune's block returning only the hidden states, like transformers' block."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


class DenseSwiGLU(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.w1 = nn.Linear(d, width, bias=False)
        self.w3 = nn.Linear(d, width, bias=False)
        self.w2 = nn.Linear(width, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def mixtune_block(d, n, E, K, seed=0) -> MoEOnly:
    torch.manual_seed(seed)
    block = MoEBlock(TopKRouter(d, E, K), GroupedExperts(E, d, n))
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return MoEOnly(block)


def hf_block_like(ours: MoEOnly, experts_implementation: str) -> MixtralSparseMoeBlock:
    experts = ours.block.experts
    cfg = HFConfig(
        hidden_size=experts.hidden_size,
        intermediate_size=experts.intermediate_size,
        num_local_experts=experts.num_experts,
        num_experts_per_tok=ours.block.router.top_k,
    )
    cfg._experts_implementation = experts_implementation
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.block.router.proj.weight)
        hf.experts.gate_up_proj.copy_(experts.gate_up_proj)
        hf.experts.down_proj.copy_(experts.down_proj)
    return hf


def dense_like(d, n, K, seed=0) -> DenseSwiGLU:
    torch.manual_seed(seed)
    dense = DenseSwiGLU(d, K * n)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    return dense


def with_lora(module: nn.Module, kind: str, rank: int) -> nn.Module:
    """Freeze the base and put rank-r LoRA on every expert projection (or the dense FFN's three)."""
    module.requires_grad_(False)
    if kind == "mixtune":
        config = make_lora_config(["w1", "w2", "w3"], rank, 2 * rank)
    elif kind == "hf":
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=[],
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["w1", "w2", "w3"])
    module = inject_adapter_in_model(config, module)
    with torch.no_grad():  # a trained-looking adapter, not B = 0
        for name, p in module.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    return module


def train_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Forward and backward through the layer (input gradient included, as inside a network)."""
    x = x.detach().requires_grad_(True)
    module(x).backward(grad_out)
    for p in module.parameters():
        p.grad = None
