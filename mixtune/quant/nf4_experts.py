"""Mixtral experts with 4-bit NF4 weights, run through the same grouped path as the dense ones.

transformers quantises only nn.Linear layers, so its QLoRA leaves fused 3-D experts (90% of
Mixtral's weights) in full precision. Here every expert's gate_up (2I, D) and down (D, I) matrix is
quantised on its own by bitsandbytes (NF4, blocks of 64, double quantisation), and the grouped
product dequantises one expert at a time, just before the matmul of the tokens routed to it: the
full-precision stack never exists, only one expert's matrix at a time. The glue (stacking
per-expert codes, moving their statistics with the module) is ours because bitsandbytes has no
notion of a stack of matrices; the quantisation, dequantisation and 4-bit matmul are its own.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit
from torch import nn

from mixtune.model.experts import ExpertProjection, GroupedExperts

BLOCKSIZE = 64  # weights per absmax scale, as in QLoRA
QUANT_TYPE = "nf4"


class NF4ExpertStack(nn.Module):
    """E frozen (O, I) matrices, each NF4-quantised on its own: a `PerExpertWeights` for grouped_linear.

    `packed` (E, ceil(O*I/2)) uint8 holds two 4-bit codes per byte; `quant_states[e]` holds expert e's
    block scales (8-bit, themselves scaled by fp32 values: double quantisation). The statistics are
    plain attributes, not buffers, so a dtype cast of the model never touches them; `_apply` moves
    them with the codes.
    """

    def __init__(self, weight_EOI: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = weight_EOI.shape
        self.compute_dtype = compute_dtype
        packed, states = [], []
        for w_OI in weight_EOI.detach().unbind(0):
            codes, state = quantize_4bit(
                w_OI.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type=QUANT_TYPE
            )
            packed.append(codes.view(-1))
            states.append(state)
        self.register_buffer("packed", torch.stack(packed))
        self.quant_states: list[QuantState] = states

    def linear(self, x_nI: torch.Tensor, e: int) -> torch.Tensor:
        """(n, I) @ W_e^T -> (n, O) in the compute dtype, cast back to x's dtype.

        bitsandbytes' 4-bit matmul dequantises W_e for the product and again in backward, so no
        full-precision copy is kept for backward and W_e gets no gradient.
        """
        y = bnb.matmul_4bit(x_nI.to(self.compute_dtype), self.packed[e], quant_state=self.quant_states[e])
        return y.to(x_nI.dtype)

    def expert(self, e: int) -> torch.Tensor:
        """Expert e's dequantised (O, I) weight, in the dtype it was quantised from."""
        return dequantize_4bit(self.packed[e].view(-1, 1), self.quant_states[e])

    def dequantize(self) -> torch.Tensor:
        """The whole (E, O, I) stack dequantised: for tests and inspection, never on the forward path."""
        return torch.stack([self.expert(e) for e in range(self.num_experts)])

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for state in self.quant_states:
            state.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_experts} x ({self.in_features} -> {self.out_features}), {QUANT_TYPE}"


class NF4ExpertProjection(ExpertProjection):
    """LoRA attachment point on NF4 experts: PEFT attaches as on dense experts; merging is refused.

    PEFT reads `weight` for the device and `compute_dtype` for the adapters' dtype (as it does for
    bitsandbytes' Linear4bit), so nothing is dequantised to build an adapter.
    """

    quantized = True

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._owner.compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The packed (E, ceil(O*I/2)) uint8 codes of the stack this projection lives in (w1 and w3 share one)."""
        owner = self._owner
        return owner.down_proj.packed if self.name == "w2" else owner.gate_up_proj.packed


class NF4Experts(nn.Module):
    """`GroupedExperts` with NF4 weights: same forward contract, same w1/w3/w2 LoRA attachment points.

    A sibling rather than a subclass: it has no dense `gate_up_proj`/`down_proj` parameters, and code
    that reaches for them (weight export, weight init) should fail rather than see a stand-in.
    """

    # The grouped path is the dense one: only what `expert_weights()` returns differs.
    forward = GroupedExperts.forward

    def __init__(self, dense: GroupedExperts, compute_dtype: torch.dtype):
        super().__init__()
        self.num_experts = dense.num_experts
        self.hidden_size = dense.hidden_size
        self.intermediate_size = dense.intermediate_size
        self.compute_dtype = compute_dtype
        self.gate_up_proj = NF4ExpertStack(dense.gate_up_proj, compute_dtype)  # (E, 2I, D)
        self.down_proj = NF4ExpertStack(dense.down_proj, compute_dtype)  # (E, D, I)
        self.w1_proj = NF4ExpertProjection(self, "w1")
        self.w3_proj = NF4ExpertProjection(self, "w3")
        self.w2_proj = NF4ExpertProjection(self, "w2")

    def expert_weights(self) -> tuple[NF4ExpertStack, NF4ExpertStack]:
        """(gate_up, down) as per-expert 4-bit weights for `grouped_linear`."""
        return self.gate_up_proj, self.down_proj

    def dequantized(self) -> GroupedExperts:
        """A dense `GroupedExperts` holding the dequantised weights (tests, inspection)."""
        dense = GroupedExperts(self.num_experts, self.hidden_size, self.intermediate_size)
        with torch.no_grad():
            gate_up, down = self.gate_up_proj.dequantize(), self.down_proj.dequantize()
            dense.gate_up_proj.data, dense.down_proj.data = gate_up, down
        return dense.to(self.gate_up_proj.packed.device)
