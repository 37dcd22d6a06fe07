"""B3 and B4: an end-to-end LoRA training step of the small model, mixtune and transformers + PEFT.

    python -m bench.b3_b4_step [--repeats 5]

B3  tokens/s of mixtune / tokens/s of transformers + PEFT, LoRA on attention + experts
B4  step time with LoRA on attention + experts / on attention only (both implementations)
"""

from __future__ import annotations

import argparse

from bench.common import SMALL_BATCH, SMALL_MODEL, interleaved, median_ratio, table, write_result
from bench.models import base_pair, batch, hf_lora, mixtune_lora, optimizer_for, training_step


def run(repeats: int) -> dict:
    inputs = batch()
    models = {}
    for experts in (True, False):
        ours, hf = base_pair()
        suffix = "" if experts else "_attn"
        models["mixtune" + suffix] = mixtune_lora(ours, experts).train()
        models["hf" + suffix] = hf_lora(hf, experts).train()
    optimizers = {name: optimizer_for(m) for name, m in models.items()}
    fns = {name: (lambda n=name: training_step(models[n], optimizers[n], inputs)) for name in models}
    times = interleaved(fns, repeats=repeats, warmup=1)
    return {
        "B3": median_ratio(times, "hf", "mixtune"),  # tokens/s ratio = inverse time ratio
        "B4_mixtune": median_ratio(times, "mixtune", "mixtune_attn"),
        "B4_hf": median_ratio(times, "hf", "hf_attn"),
        "median_s": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(args.repeats)
    rows = [
        ("B3 tokens/s mixtune / transformers+PEFT", f"{r['B3']:.2f}", ">= 1.5"),
        ("B4 mixtune: experts+attn LoRA / attn LoRA", f"{r['B4_mixtune']:.2f}", "<= 1.15"),
        ("B4 transformers+PEFT, same ratio", f"{r['B4_hf']:.2f}", "(about 1.6 measured elsewhere)"),
    ]
    shape = f"hidden {SMALL_MODEL['hidden_size']}, {SMALL_MODEL['num_hidden_layers']} layers, batch {SMALL_BATCH['batch']}x{SMALL_BATCH['seq']}"
    print(table(f"LoRA training step, small model ({shape}), fp32", rows))
    write_result("B3", {"model": SMALL_MODEL, "batch": SMALL_BATCH, "B3": r["B3"], "median_s": r["median_s"]})
    write_result(
        "B4",
        {
            "model": SMALL_MODEL,
            "B4": r["B4_mixtune"],
            "B4_transformers_peft": r["B4_hf"],
            "median_s": r["median_s"],
        },
    )


if __name__ == "__main__":
    main()
