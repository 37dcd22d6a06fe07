"""B1, B2 and B6: one MoE layer, forward + backward, on the CPU shapes of BENCHMARKS.md.

    python -m bench.b1_b2_b6_block [--dtype float32|bfloat16] [--repeats 7]

B1  mixtune block / dense SwiGLU FFN of width K*n (same active FLOPs), frozen base + LoRA and full training
B2  transformers 5 block (fastest experts implementation; PEFT LoRA on experts) / mixtune block
B6  FLOPs counted by torch.utils.flop_counter / the ideal count for the block
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.blocks import dense_like, hf_block_like, mixtune_block, train_step, with_lora
from bench.common import BLOCK, LORA_RANK, interleaved, median_ratio, table, write_result


def ideal_flops(T, d, n, E, K, r, mode: str) -> int:
    """Expert matmuls on the routed tokens only, the router, and LoRA terms; backward as 2x forward
    for trainable weights and 1x (input gradient only) for frozen ones."""
    experts_fwd = 2 * T * K * 3 * d * n
    router_fwd = 2 * T * d * E
    if mode == "full":
        return 3 * (experts_fwd + router_fwd)
    lora_fwd = 2 * T * K * r * ((d + n) + (d + n) + (n + d))  # w1, w3: d->n; w2: n->d
    return 2 * (experts_fwd + router_fwd) + 3 * lora_fwd


def counted_flops(module, x, grad_out) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(module, x, grad_out)
    return counter.get_total_flops()


def run(dtype: torch.dtype, repeats: int) -> dict:
    d, n, E, K, T = (BLOCK[k] for k in ("d", "n", "E", "K", "T"))
    torch.manual_seed(0)
    x = torch.randn(1, T, d, dtype=dtype)
    grad_out = torch.randn(1, T, d, dtype=dtype)
    results = {}
    for mode in ("lora", "full"):
        ours = mixtune_block(d, n, E, K).to(dtype)
        dense = dense_like(d, n, K).to(dtype)
        hfs = {impl: hf_block_like(ours, impl).to(dtype) for impl in ("eager", "grouped_mm")}
        if mode == "lora":
            ours, dense = with_lora(ours, "mixtune", LORA_RANK), with_lora(dense, "dense", LORA_RANK)
            hfs = {impl: with_lora(m, "hf", LORA_RANK) for impl, m in hfs.items()}
        modules = {"mixtune": ours, "dense": dense, **{f"hf_{impl}": m for impl, m in hfs.items()}}
        fns = {name: partial(train_step, m, x, grad_out) for name, m in modules.items()}
        times = interleaved(fns, repeats=repeats)
        best_hf = min(("hf_eager", "hf_grouped_mm"), key=lambda k: sorted(times[k])[len(times[k]) // 2])
        results[mode] = {
            "B1": median_ratio(times, "mixtune", "dense"),
            "B2": median_ratio(times, best_hf, "mixtune"),
            "B2_peer": best_hf,
            "B6": counted_flops(ours, x, grad_out) / ideal_flops(T, d, n, E, K, LORA_RANK, mode),
            "median_s": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
        }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    res = run(getattr(torch, args.dtype), args.repeats)
    for mode, r in res.items():
        rows = [
            ("B1 mixtune / dense-equivalent", f"{r['B1']:.2f}", "<= 1.15"),
            (f"B2 transformers+PEFT ({r['B2_peer']}) / mixtune", f"{r['B2']:.2f}", ">= 1.3"),
            ("B6 counted / ideal FLOPs", f"{r['B6']:.3f}", "1.00"),
        ]
        print(
            table(
                f"MoE layer d={BLOCK['d']} n={BLOCK['n']} E={BLOCK['E']} K={BLOCK['K']} T={BLOCK['T']}, {args.dtype}, {mode}",
                rows,
            )
        )
    for metric in ("B1", "B2", "B6"):
        write_result(
            f"{metric}_{args.dtype}",
            {
                "shape": BLOCK,
                "dtype": args.dtype,
                "repeats": args.repeats,
                **{m: {metric: r[metric], "median_s": r["median_s"]} for m, r in res.items()},
            },
        )


if __name__ == "__main__":
    main()
