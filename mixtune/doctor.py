"""Pre-flight check of a recipe: `python -m mixtune.doctor RECIPE [--stage sft|dpo] [key=value ...]`.

Prints one PASS / WARN / FAIL / SKIP line per check (recipe, model, sliding window, data, chat
template, build, adapters, 4-bit, ZeRO-3 leaves, router losses at step 0) and exits 1 if any
check failed. Runs on a CPU in seconds for small models; a model over --max-params is checked on
a stand-in of the same MoE shape and its forward is skipped. See docs/router.md.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from typing import TypeVar

from mixtune.preflight.data_checks import check_chat_template, check_data
from mixtune.preflight.model_checks import (
    build_for_checks,
    check_adapters,
    check_quantisation,
    check_router_losses,
    check_zero3,
    default_max_params,
)
from mixtune.preflight.recipe_checks import (
    check_model_config,
    check_recipe,
    check_sliding_window,
    choose_stage,
)
from mixtune.preflight.report import Report

T = TypeVar("T")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixtune.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, as for mixtune.sft"
    )
    parser.add_argument(
        "--stage", choices=("sft", "dpo"), help="default: the recipe's stage key, else its path"
    )
    parser.add_argument(
        "--max-params",
        type=float,
        default=None,
        help="largest model built and run here (default: 1e9 on CPU, no limit with a GPU)",
    )
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --stage


def guarded(report: Report, name: str, check: Callable[..., T], *args) -> T | None:
    """Run one check; a crash inside it is that check's FAIL, not the end of the doctor."""
    try:
        return check(report, *args)
    except Exception as err:
        report.fail(name, f"the check itself crashed: {type(err).__name__}: {err}")
        return None


def run_checks(recipe_path: str, stage: str, overrides: list[str], max_params: int, report: Report) -> None:
    """Every check in order; a check whose inputs failed to load is skipped with a reason."""
    recipe = check_recipe(report, recipe_path, stage, overrides)
    if recipe is None:
        report.skip("everything", "the other checks need a valid recipe")
        return
    model_info = guarded(report, "model", check_model_config, recipe)
    if model_info is not None:
        guarded(report, "sliding window", check_sliding_window, recipe, model_info[0])
    data = guarded(report, "data", check_data, recipe)
    if data is not None:
        guarded(report, "chat template", check_chat_template, recipe, data.tokenizer)
    if model_info is None:
        report.skip("model checks", "no model config to build from")
        return
    built = guarded(report, "build", build_for_checks, recipe, *model_info, max_params)
    if built is None:
        return
    guarded(report, "adapters", check_adapters, recipe, built)
    guarded(report, "4-bit", check_quantisation, recipe, built)
    guarded(report, "zero3 leaves", check_zero3, built)
    if data is None:
        report.skip("router losses", "no data to run a batch of")
    else:
        guarded(
            report,
            "router losses",
            check_router_losses,
            recipe,
            built,
            data.train,
            data.tokenizer.pad_token_id,
        )


def main(argv: list[str] | None = None) -> int:
    from mixtune.train.setup import is_main_process, shutdown  # the training stack, only when checking

    args = parse_args(argv)
    stage, why = choose_stage(args.recipe, args.stage)
    # Under a multi-process launch every rank runs the checks (ZeRO-3 gathers are collective); rank 0 prints.
    stream = sys.stdout if is_main_process() else io.StringIO()
    print(f"mixtune doctor: {args.recipe} (stage {stage}: {why})", file=stream, flush=True)
    report = Report(stream)
    max_params = int(args.max_params) if args.max_params is not None else default_max_params()
    run_checks(args.recipe, stage, args.overrides, max_params, report)
    print(report.totals(), file=stream)
    shutdown(finished=True)  # every rank gets here (each check is guarded): a launched doctor exits cleanly
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
