"""Checks on the model as setup builds it: adapters and router policy, 4-bit experts, ZeRO-3 leaves,
and the router losses of one forward at step 0.

A model too large for this machine (more parameters than --max-params) is not loaded: the
structural checks run on a stand-in, a 2-layer, width-64 Mixtral with the same experts, top-k,
vocabulary, window and recipe (LoRA targets, router policy, 4-bit), built by the same code path;
the forward is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from mixtune.lora.apply import TARGET_MODULES
from mixtune.model import MixtralConfig
from mixtune.model.moe import MoEBlock
from mixtune.recipe import Recipe

from .recipe_checks import human
from .report import Report

# Parameters a CPU machine builds and runs one forward of in seconds to a minute (fp32: 4 GB at 1B).
CPU_MAX_PARAMS = 1_000_000_000
STAND_IN = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=None
)
BATCH_EXAMPLES = 4


@dataclass
class BuiltModel:
    model: Any
    stand_in: bool


def default_max_params() -> int:
    """No limit where a GPU is (the doctor runs where training will); CPU_MAX_PARAMS otherwise."""
    return 10**15 if torch.cuda.is_available() else CPU_MAX_PARAMS


def stand_in_recipe(recipe: Recipe, config: MixtralConfig) -> Recipe:
    """The recipe with its model swapped for a small one of the same MoE shape (see the module docstring)."""
    keep = (
        "vocab_size",
        "num_local_experts",
        "num_experts_per_tok",
        "sliding_window",
        "max_position_embeddings",
    )
    overrides = {name: getattr(config, name) for name in keep}
    overrides.update(STAND_IN, rope_theta=config.rope_base, router_aux_loss_coef=config.router_aux_loss_coef)
    # Grouped-query attention stays grouped (2 KV heads), multi-head stays multi-head.
    overrides["num_key_value_heads"] = 4 if config.num_key_value_heads == config.num_attention_heads else 2
    model = dataclasses.replace(recipe.model, name_or_path="preset:tiny", config_overrides=overrides)
    # A continued adapter fits only the real shapes; the stand-in gets a fresh one from the recipe.
    return dataclasses.replace(recipe, model=model, lora=dataclasses.replace(recipe.lora, init_from=None))


def build_for_checks(
    report: Report, recipe: Recipe, config: MixtralConfig, params: int, max_params: int
) -> BuiltModel | None:
    """The model as setup.build_model makes it, or a stand-in when it is too big here."""
    from mixtune.train.setup import build_model

    stand_in = params > max_params
    try:
        model = build_model(stand_in_recipe(recipe, config) if stand_in else recipe)
    except Exception as err:
        report.fail("build", f"setup.build_model failed: {type(err).__name__}: {err}")
        return None
    if stand_in:
        report.skip(
            "build",
            f"{human(params)} parameters is over --max-params {human(max_params)} here: not loaded; adapter, 4-bit "
            "and ZeRO-3 checks run on a 2-layer stand-in of the same MoE shape built by the same code",
        )
    return BuiltModel(model, stand_in)


def check_adapters(report: Report, recipe: Recipe, built: BuiltModel) -> None:
    """Trainable parameter names against the recipe: LoRA where targeted, router trainable iff policy != frozen."""
    params = dict(built.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    problems = []
    lora = recipe.lora
    if lora.enabled:
        for target, suffix in TARGET_MODULES.items():
            has, want = any(f".{suffix}.lora_" in n for n in trainable), target in lora.targets
            if has != want:
                problems.append(
                    f"{target}: LoRA {'present' if has else 'missing'} but lora.targets {'omits' if has else 'lists'} it"
                )
        base = [n for n in trainable if "lora_" not in n and "modules_to_save" not in n]
        if base:
            problems.append(f"{len(base)} base weights are trainable under LoRA, e.g. {base[0]}")
    else:
        frozen = [n for n, p in params.items() if not p.requires_grad and ".router." not in n]
        if frozen:
            problems.append(f"full fine-tuning but {len(frozen)} weights are frozen, e.g. {frozen[0]}")
    router_trains = any(".router." in n for n in trainable)
    if router_trains != (recipe.router.policy != "frozen"):
        problems.append(
            f"router.policy is {recipe.router.policy} but the router is {'trainable' if router_trains else 'frozen'}"
        )
    if lora.init_from and not built.stand_in:
        problems = [f"{p} (the continued adapter {lora.init_from} decides its targets)" for p in problems]
    from mixtune.train.setup import count_parameters

    count, total = count_parameters(built.model)
    experts = [t for t in ("w1", "w2", "w3") if t in lora.targets] if lora.enabled else ["all"]
    what = f"LoRA r={lora.r} on {', '.join(lora.targets)}" if lora.enabled else "full fine-tuning"
    text = (
        f"{what}; expert weights trained: {', '.join(experts) or 'none'}; router "
        f"{'trainable' if router_trains else 'frozen'} (router.policy {recipe.router.policy}); "
        f"{human(count)} of {human(total)} parameters trainable" + (" (stand-in)" if built.stand_in else "")
    )
    if problems:
        report.fail("adapters", "; ".join(problems))
    else:
        report.passed("adapters", text)


def check_quantisation(report: Report, recipe: Recipe, built: BuiltModel) -> None:
    """Experts (and attention) in 4-bit exactly when the recipe asks for QLoRA."""
    kinds = Counter(type(m).__name__ for m in built.model.modules())
    blocks = kinds["MoEBlock"]
    asked = recipe.model.load_in_4bit
    if asked:
        from mixtune.quant import NF4Experts, is_quantized  # bitsandbytes only when 4-bit is asked for

        experts = sum(isinstance(m, NF4Experts) for m in built.model.modules())
        if is_quantized(built.model) and experts == blocks:
            report.passed(
                "4-bit", f"experts NF4 in all {blocks} layers, {kinds['Linear4bit']} 4-bit linear layers"
            )
        else:
            report.fail(
                "4-bit", f"model.load_in_4bit is set but only {experts} of {blocks} layers have 4-bit experts"
            )
    elif kinds["NF4Experts"] or kinds["Linear4bit"]:
        report.fail("4-bit", "4-bit layers found though model.load_in_4bit is false")
    else:
        report.passed("4-bit", f"full precision ({recipe.model.dtype}), as model.load_in_4bit is false")


def check_zero3(report: Report, built: BuiltModel) -> None:
    """Under ZeRO-3 every MoE block must be a leaf (mixtune.distributed), or divergent routing can hang ranks."""
    from mixtune.distributed import leaf_count, zero3_enabled

    if not zero3_enabled():
        report.skip(
            "zero3 leaves",
            "ZeRO-3 is not on in this launch; run the doctor the way training launches "
            "(accelerate launch --config_file configs/<zero3>.yaml -m mixtune.doctor ...) to check",
        )
        return
    blocks = sum(isinstance(m, MoEBlock) for m in built.model.modules())
    leaves = leaf_count(built.model)
    if leaves == blocks and blocks:
        report.passed("zero3 leaves", f"all {blocks} MoE blocks are ZeRO-3 leaf modules")
    else:
        report.fail(
            "zero3 leaves",
            f"{leaves} of {blocks} MoE blocks are ZeRO-3 leaves: ranks routing differently can hang",
        )


def _batch(recipe: Recipe, train, pad_id: int) -> dict[str, torch.Tensor]:
    """The first examples as the trainer sees them: ids and labels (-100 off the trained tokens), right-padded."""
    rows = [train[i] for i in range(min(BATCH_EXAMPLES, len(train)))]
    if recipe.stage == "sft":
        pairs = [(r["input_ids"], r["labels"]) for r in rows]
    else:  # policy pass of DPO: prompt + chosen and prompt + rejected, completion tokens counted
        pairs = [
            (r["prompt_ids"] + r[side], [-100] * len(r["prompt_ids"]) + r[side])
            for side in ("chosen_ids", "rejected_ids")
            for r in rows
        ]
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(pairs):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _whole_weights(model) -> contextlib.AbstractContextManager:
    """Under ZeRO-3 (no engine here) gather the partitioned weights for the forward; else nothing."""
    from mixtune.distributed import zero3_enabled

    if not zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


@torch.no_grad()
def check_router_losses(report: Report, recipe: Recipe, built: BuiltModel, train, pad_id: int) -> None:
    """One forward on real examples through the trainers' own router loss code: both losses non-zero."""
    if built.stand_in:
        report.skip("router losses", "step-0 forward skipped: the model is too big to run here (see build)")
        return
    from mixtune.inference import base_config
    from mixtune.train.objective import sft_objective
    from mixtune.train.router_loss import loss_token_mask, router_losses
    from mixtune.train.setup import router_loss_config

    model = built.model
    cfg = router_loss_config(recipe, model)
    top_k = base_config(model).num_experts_per_tok
    batch = {k: v.to(next(model.parameters()).device) for k, v in _batch(recipe, train, pad_id).items()}
    model.eval()
    with _whole_weights(model):
        if recipe.stage == "sft":
            router = sft_objective(model, batch, cfg, top_k).router
        else:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_router_logits=True,
                logits_to_keep=1,
            )
            router = router_losses(
                out.router_logits, loss_token_mask(batch["labels"]), top_k, scope=cfg.scope
            )
    balance, z, tokens = router.balance.item(), router.z_loss.item(), int(router.tokens.item())
    text = (
        f"balance {balance:.4g} (x coef {cfg.balance_coef:g}; {top_k} = perfectly even), z-loss {z:.4g} "
        f"(x coef {cfg.z_loss_coef:g}) over {tokens} counted tokens of {batch['input_ids'].shape[0]} sequences"
    )
    if tokens == 0:
        report.fail("router losses", "no token of the first batch carries loss (every label is -100)")
    elif not (math.isfinite(balance) and math.isfinite(z)) or balance <= 0 or z <= 0:
        report.fail("router losses", text)
    elif cfg.balance_coef == 0 or cfg.z_loss_coef == 0:
        zero = " and ".join(
            n for n, c in (("balance", cfg.balance_coef), ("z-loss", cfg.z_loss_coef)) if c == 0
        )
        report.warn(
            "router losses", f"{text}; the {zero} coefficient is 0, so it is computed but not trained"
        )
    else:
        report.passed("router losses", text)
