"""B5: peak memory of a LoRA training step, mixtune / transformers + PEFT (attention + experts).

    python -m bench.b5_memory

Each implementation runs in a fresh process (peak RSS is per process). The figure is the growth of
resident memory over the model-and-optimizer baseline during three training steps: activations,
gradients, optimizer state and temporaries, what LoRA training adds on top of the weights.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from bench.common import table, write_result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def probe(impl: str) -> dict:
    from bench.models import base_pair, batch, hf_lora, mixtune_lora, optimizer_for, training_step

    ours, hf = base_pair()
    model = mixtune_lora(ours, True) if impl == "mixtune" else hf_lora(hf, True)
    del ours, hf
    model.train()
    optimizer = optimizer_for(model)
    inputs = batch()
    base = _rss_bytes()
    for _ in range(3):
        training_step(model, optimizer, inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_bytes": base, "peak_bytes": peak, "step_bytes": peak - base}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2])))
        return
    results = {}
    for impl in ("mixtune", "hf"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.b5_memory", "--probe", impl],
            capture_output=True,
            text=True,
            check=True,
        )
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = results["mixtune"]["step_bytes"] / results["hf"]["step_bytes"]
    rows = [
        ("mixtune step memory (MB)", f"{results['mixtune']['step_bytes'] / 1e6:.0f}", ""),
        ("transformers+PEFT step memory (MB)", f"{results['hf']['step_bytes'] / 1e6:.0f}", ""),
        ("B5 mixtune / transformers+PEFT", f"{ratio:.2f}", "<= 0.8"),
    ]
    print(
        table(
            "Peak memory of a LoRA training step (growth over weights + optimizer), small model, fp32", rows
        )
    )
    write_result("B5", {"B5": ratio, **results})


if __name__ == "__main__":
    main()
