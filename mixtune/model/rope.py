"""Rotary position embeddings (RoPE), computed from position ids so packed rows can restart."""

from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids_BT: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (B, T, head_dim), for the given positions.

    Computed in fp32 and cast to the activation dtype, the order transformers uses, so bf16 runs
    round the same way. Recomputed per forward: it is B*T*head_dim work and saves keeping a buffer
    valid across meta-device construction, ZeRO-3 partitioning and dtype changes.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids_BT.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)  # (head_dim/2,)
    angles = position_ids_BT[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by their positions (half-split convention, as Mixtral's weights expect)."""
    cos, sin = cos_BTD[:, None], sin_BTD[:, None]
    half = x_BHTD.shape[-1] // 2
    rotated = torch.cat((-x_BHTD[..., half:], x_BHTD[..., :half]), dim=-1)
    return x_BHTD * cos + rotated * sin
