"""Which keys each query may attend to: causal, padding, sliding window, packed examples.

Returned as a boolean (B, 1, Tq, Tk) mask for scaled_dot_product_attention, or None when plain
causal attention is exact (SDPA's fast `is_causal` path).
"""

from __future__ import annotations

import torch


def segment_ids(position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Number each packed example in a row: a new one starts wherever positions do not count up by one."""
    starts = torch.ones_like(position_ids_BT, dtype=torch.bool)
    starts[:, 1:] = position_ids_BT[:, 1:] != position_ids_BT[:, :-1] + 1
    return starts.cumsum(dim=1)


def training_mask(
    attention_mask_BT: torch.Tensor | None,
    position_ids_BT: torch.Tensor | None,
    seq_len: int,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Mask for a full forward over a (B, T) batch with no cache."""
    has_padding = attention_mask_BT is not None and not bool(attention_mask_BT.all())
    is_packed = position_ids_BT is not None and bool((segment_ids(position_ids_BT)[:, -1] > 1).any())
    window_bites = sliding_window is not None and seq_len > sliding_window
    if not (has_padding or is_packed or window_bites):
        return None

    idx = torch.arange(seq_len, device=device)
    allowed = idx[None, :] <= idx[:, None]  # (Tq, Tk): key not after query
    if window_bites:
        allowed = allowed & (idx[:, None] - idx[None, :] < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if is_packed:
        seg = segment_ids(position_ids_BT)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    if has_padding:
        allowed = allowed & attention_mask_BT.bool()[:, None, None, :]
    # A padding query may have no key left; letting every token see itself keeps its softmax finite
    # and changes nothing for real tokens (they always see themselves).
    return allowed | torch.eye(seq_len, dtype=torch.bool, device=device)[None, None]


def position_mask(
    query_pos_BT: torch.Tensor, key_pos_BS: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Mask from absolute positions, for attention over a KV cache.

    Keys with position -1 are empty cache slots or padding. The cache may hold keys in any order
    (a rolling buffer wraps around), so the mask is built from positions, never from slot order.
    """
    q = query_pos_BT[:, None, :, None]
    k = key_pos_BS[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    return allowed | (q < 0)  # padding queries: anything finite will do, their outputs are ignored
