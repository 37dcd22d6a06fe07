"""B8 (GPU only): MoE layer throughput at Mixtral 8x7B dimensions, as % of the measured matmul ceiling.

    python -m bench.b8_gpu [--tokens 4096 16384]

One layer (d=4096, n=14336, E=8, K=2) in bf16, forward + backward, full training and frozen base +
LoRA; TFLOP/s counts only the FLOPs the layer must do (routed tokens only, see B6). The ceiling is
a dense bf16 matmul of the same size measured in the same run.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.b1_b2_b6_block import ideal_flops
from bench.blocks import mixtune_block, train_step, with_lora
from bench.common import LORA_RANK, table, write_result

MIXTRAL = dict(d=4096, n=14336, E=8, K=2)


def cuda_seconds(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def matmul_ceiling(T: int, d: int, n: int) -> float:
    a = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    return 2 * T * d * n / cuda_seconds(lambda: a @ b) / 1e12


def run(tokens: list[int]) -> dict:
    d, n, E, K = (MIXTRAL[k] for k in ("d", "n", "E", "K"))
    results = {}
    for T in tokens:
        ceiling = matmul_ceiling(T * K, d, n)  # all T*K routed rows as one dense product
        x = torch.randn(1, T, d, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn_like(x)
        for mode in ("full", "lora"):
            block = mixtune_block(d, n, E, K).to("cuda", torch.bfloat16)
            if mode == "lora":
                block = with_lora(block, "mixtune", LORA_RANK).to("cuda", torch.bfloat16)
            seconds = cuda_seconds(partial(train_step, block, x, grad))
            tflops = ideal_flops(T, d, n, E, K, LORA_RANK, mode) / seconds / 1e12
            results[f"T{T}_{mode}"] = {
                "tflops": tflops,
                "ceiling_tflops": ceiling,
                "percent": 100 * tflops / ceiling,
            }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("B8 needs a CUDA GPU")
    res = run(args.tokens)
    rows = [
        (k, f"{v['tflops']:.0f} TF/s", f"{v['percent']:.0f}% of {v['ceiling_tflops']:.0f}")
        for k, v in res.items()
    ]
    print(table(f"Mixtral 8x7B MoE layer, bf16, {torch.cuda.get_device_name()}", rows))
    write_result("B8", {"shape": MIXTRAL, "results": res})


if __name__ == "__main__":
    main()
