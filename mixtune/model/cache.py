"""Key/value cache for generation, a rolling buffer when the model has a sliding window.

With a window W a token never looks further back than W - 1 positions, so the cache keeps only
the last W keys per layer (slot = column % W), as in the Mixtral paper's rolling buffer. Queries of a
chunk attend to the cache plus the chunk itself before the chunk is written, so chunks of any size
are exact: chunked prefill only bounds the size of the attention matrix.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key, value and position buffers of shape (B, H_kv, S, D) and (B, S)."""

    def __init__(
        self,
        batch_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Position of the token held in each slot; -1 marks an empty slot or a padding token.
        self.positions = torch.full((batch_size, capacity), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.seen = 0  # columns written so far (all layers advance together)

    def attend(
        self, layer: int, k_BHCD: torch.Tensor, v_BHCD: torch.Tensor, pos_BC: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and key positions a new chunk attends to: the cache, then the chunk."""
        keys = torch.cat((self.keys[layer], k_BHCD), dim=2)
        values = torch.cat((self.values[layer], v_BHCD), dim=2)
        return keys, values, torch.cat((self.positions, pos_BC), dim=1)

    def store(self, layer: int, k_BHCD: torch.Tensor, v_BHCD: torch.Tensor) -> None:
        """Write a chunk's keys and values into its slots (only the last `capacity` columns survive)."""
        chunk = k_BHCD.shape[2]
        keep = min(chunk, self.capacity)
        slots = self._slots(chunk)[-keep:]
        self.keys[layer][:, :, slots] = k_BHCD[:, :, -keep:]
        self.values[layer][:, :, slots] = v_BHCD[:, :, -keep:]

    def advance(self, pos_BC: torch.Tensor) -> None:
        """Record the chunk's positions once every layer has stored it."""
        chunk = pos_BC.shape[1]
        keep = min(chunk, self.capacity)
        self.positions[:, self._slots(chunk)[-keep:]] = pos_BC[:, -keep:]
        self.seen += chunk

    def _slots(self, chunk: int) -> torch.Tensor:
        columns = torch.arange(self.seen, self.seen + chunk, device=self.positions.device)
        return columns % self.capacity
