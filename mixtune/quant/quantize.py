"""QLoRA's base model: attention projections and experts in 4-bit NF4, the rest as loaded.

Quantised: q/k/v/o (bitsandbytes `Linear4bit`) and every expert (`NF4Experts`), 99.4% of
Mixtral 8x7B's weights. Kept in the recipe dtype, as QLoRA does: embeddings, lm_head, norms (small
and precision-sensitive) and the router (small, and its top-k flips on small logit differences).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from mixtune.model.experts import GroupedExperts

from .nf4_experts import BLOCKSIZE, QUANT_TYPE, NF4Experts

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantize_linear_4bit(linear: nn.Linear, compute_dtype: torch.dtype) -> bnb.nn.Linear4bit:
    """An NF4 `Linear4bit` (blocks of 64, double quantisation) holding `linear`'s weight, on its device."""
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        device="meta",  # no throwaway random init of a full-size weight
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        module=quantized,
    )
    # Params4bit quantises when it is first moved to a device; this is that move.
    quantized.weight = weight.to(linear.weight.device)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized


def quantize_layer_4bit(layer: nn.Module, compute_dtype: torch.dtype) -> None:
    """Quantise one decoder layer's q/k/v/o and experts in place, where its weights are."""
    attention = layer.self_attn
    for name in ATTENTION_PROJECTIONS:
        projection = getattr(attention, name)
        if not isinstance(projection, bnb.nn.Linear4bit):
            setattr(attention, name, quantize_linear_4bit(projection, compute_dtype))
    dense = layer.mlp.experts
    if isinstance(dense, GroupedExperts):
        layer.mlp.experts = NF4Experts(dense, compute_dtype)
        # Experts and their attachment points reference each other, a cycle that only the garbage
        # collector frees: drop the full-precision stacks now, or layers of them pile up meanwhile.
        dense.gate_up_proj = dense.down_proj = None


def quantize_model_4bit(
    model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str | None = None
) -> nn.Module:
    """Quantise a mixtune Mixtral in place, layer by layer, before adapters are added; returns it.

    With `device` (a GPU), each layer moves there and is quantised there, so the GPU never holds
    more than one full-precision layer; the rest of the model follows at the end. Without it, the
    weights are quantised where they are.
    """
    for layer in model.model.layers:
        if device is not None:
            layer.to(device)
        quantize_layer_4bit(layer, compute_dtype)
    if device is not None:
        model.to(device)
    # PEFT wraps Linear4bit in its bitsandbytes LoRA layer only when this is set, and TRL keys its
    # QLoRA handling (adapters in bf16) on it, as for a transformers model loaded in 4-bit.
    model.is_loaded_in_4bit = True
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether any of the model's weights are held in 4-bit."""
    return any(isinstance(m, (bnb.nn.Linear4bit, NF4Experts)) for m in model.modules())
