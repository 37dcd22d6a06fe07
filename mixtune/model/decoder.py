"""One decoder layer: RMSNorm, attention, residual; RMSNorm, MoE block, residual."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import Attention
from .cache import KVCache
from .config import MixtralConfig
from .experts import GroupedExperts
from .moe import MoEBlock
from .router import TopKRouter


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block with a sparse MoE feed-forward.

    Subclassing transformers' GradientCheckpointingLayer gives activation checkpointing through the
    standard `activation_checkpointing_enable()` switch the trainers use.
    """

    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEBlock(
            TopKRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok),
            GroupedExperts(config.num_local_experts, config.hidden_size, config.intermediate_size),
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        position_ids_BT: torch.Tensor,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> (B, T, D) and this layer's (B*T, E) router logits."""
        x_BTD = x_BTD + self.self_attn(
            self.input_layernorm(x_BTD), rope, mask, position_ids_BT, past_key_values
        )
        moe_out, router_logits = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + moe_out, router_logits
