"""Routing analysis per domain, like the Mixtral paper's section 5:

    python -m mixtune.analyze MODEL_DIR --data NAME=FILE [NAME=FILE ...] [--compare OTHER_MODEL_DIR]
                              [--out DIR] [--limit N]

For each domain file, every token's experts in every layer: each expert's share of tokens (first
choice and top-k), and how often consecutive tokens keep an expert (first choice, and top-k sets
that share one) against the random baselines and the paper's figures. With --compare, the same for
a second model on the same token ids (e.g. the model before fine-tuning) and the deltas.
Writes analysis.json, repetition.png and shares.png to --out. See docs/router.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixtune.analysis.domains import load_domain, parse_domain
from mixtune.analysis.report import DomainResult, domain_table, header, to_json, write_plots
from mixtune.analysis.route import routing_stats
from mixtune.data import DataError
from mixtune.inference import base_config, load_for_inference


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixtune.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a mixtune model or adapter directory (an export, an SFT/DPO output)")
    parser.add_argument("--data", nargs="+", required=True, metavar="NAME=FILE", help="domain files")
    parser.add_argument(
        "--compare", metavar="OTHER_MODEL_DIR", help="a second model: deltas are MODEL - OTHER"
    )
    parser.add_argument("--out", type=Path, default=Path("analysis"), help="where analysis.json and plots go")
    parser.add_argument("--limit", type=int, default=64, help="rows read per domain (default 64)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens kept per sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype, device=args.device)
    config = base_config(model)
    other = None
    if args.compare:
        other, _ = load_for_inference(args.compare, dtype=args.dtype, device=args.device)
        shape = ("num_hidden_layers", "num_local_experts", "num_experts_per_tok")
        if any(getattr(base_config(other), k) != getattr(config, k) for k in shape):
            print(
                f"mixtune.analyze: {args.compare} has another layer/expert shape than {args.model}",
                file=sys.stderr,
            )
            return 2
    E, k, L = config.num_local_experts, config.num_experts_per_tok, config.num_hidden_layers
    print(header(args.model, args.compare, E, k, L))
    results = []
    for text in args.data:
        name, path = parse_domain(text)
        try:
            domain = load_domain(name, path, tokenizer, args.limit, args.max_length)
        except DataError as err:
            print(f"mixtune.analyze: {name}: {err}", file=sys.stderr)
            return 2
        if not domain.sequences:
            print(f"mixtune.analyze: {name}: no usable rows in {path}", file=sys.stderr)
            return 2
        stats = routing_stats(model, domain.sequences, args.batch_size)
        before = (
            routing_stats(other, domain.sequences, args.batch_size).layers() if other is not None else None
        )
        result = DomainResult(domain, stats.tokens, stats.layers(), before)
        print("\n" + domain_table(result, k))
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    report = to_json(results, args.model, args.compare, E, k)
    (args.out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    files = [args.out / "analysis.json"]
    if not args.no_plots:
        files += write_plots(results, args.out, E, k)
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
