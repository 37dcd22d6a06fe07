"""`make bench`: every benchmark in turn; each prints its table and writes bench/results/<id>.json.

    python -m bench.run_all [--quick]

B8 (GPU) runs only where CUDA is available. Run on an otherwise idle machine: the figures are
ratios measured side by side, but a busy machine still adds noise to them.
"""

from __future__ import annotations

import argparse

import torch

from bench import b1_b2_b6_block, b3_b4_step, b5_memory, b7_dpo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args(argv)
    repeats = ["--repeats", "3"] if args.quick else []
    b1_b2_b6_block.main(repeats)
    if not args.quick:
        b1_b2_b6_block.main(["--dtype", "bfloat16", *repeats])
    b3_b4_step.main(repeats)
    b5_memory.main()
    b7_dpo.main(repeats)
    if torch.cuda.is_available():
        from bench import b8_gpu

        b8_gpu.main([])
    else:
        print("B8 skipped: no CUDA GPU on this machine")


if __name__ == "__main__":
    main()
