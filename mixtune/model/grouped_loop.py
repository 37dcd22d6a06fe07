"""The portable grouped product: one `mm` per expert group, written straight into one buffer.

`torch._grouped_mm` is the fused kernel on GPUs, but on CPU (torch 2.13) it has no backward. A
plain loop of `x[group] @ W[e].T` plus `torch.cat` works through autograd, yet copies every output
once more in `cat` and stacks the weight gradients again in backward. This autograd function does
the same products with `out=` views of preallocated buffers, in forward and backward alike, and
computes no weight gradient for frozen weights.
"""

from __future__ import annotations

import torch


def _bounds(group_sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty group."""
    out, start = [], 0
    for e, size in enumerate(group_sizes):
        if size:
            out.append((e, start, start + size))
        start += size
    return out


class GroupedLinearLoop(torch.autograd.Function):
    """(N, I) rows grouped by expert, (E, O, I) weights -> (N, O)."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, weight_EOI: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        out = x_NI.new_empty(x_NI.shape[0], weight_EOI.shape[1])
        bounds = _bounds(group_sizes)
        for e, a, b in bounds:
            torch.mm(x_NI[a:b], weight_EOI[e].t(), out=out[a:b])
        ctx.bounds = bounds
        ctx.save_for_backward(x_NI, weight_EOI)
        return out

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):
        x_NI, weight_EOI = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x_NI.new_empty(x_NI.shape)
            for e, a, b in ctx.bounds:
                torch.mm(grad_NO[a:b], weight_EOI[e], out=grad_x[a:b])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight_EOI)  # experts without tokens get an exact zero
            for e, a, b in ctx.bounds:
                torch.mm(grad_NO[a:b].t(), x_NI[a:b], out=grad_w[e])
        return grad_x, grad_w, None
