"""DeepSpeed ZeRO-3 for mixtune's Mixtral: detection, partitioned construction, MoE leaf modules.

ZeRO-3 is switched on by the launch, not by the recipe: `accelerate launch --config_file
configs/zero3.yaml ...` makes TrainingArguments (built when the recipe loads) register DeepSpeed's
config with transformers, and `is_deepspeed_zero3_enabled()` reads it from there. Nothing else
here runs otherwise, and deepspeed is imported only when ZeRO-3 is on.

Three things mixtune does itself, because its model is its own (see docs/distributed.md):
- build models inside `deepspeed.zero.Init`, so each rank only ever keeps its shard; a preset's
  random init is then re-run one module at a time on rank 0, to give the weights one process gives;
- load checkpoints one parameter at a time into the partitioned model (see weights.load_pretrained);
- mark every MoE block a ZeRO-3 leaf before the engine is built.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

from mixtune.model.moe import MoEBlock


def zero3_enabled() -> bool:
    """True inside a launch whose DeepSpeed config is ZeRO stage 3."""
    return is_deepspeed_zero3_enabled()


def rank() -> int:
    """This process's global rank (0 outside a launch)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _quiet_deepspeed_collectives() -> None:
    # DeepSpeed 0.19 calls torch's deprecated collective names on every step, which prints two
    # FutureWarnings per parameter bucket per step; they say nothing about the user's run.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        category=FutureWarning,
    )


@contextmanager
def partitioned_init(skip_init: bool = False) -> Iterator[None]:
    """Construct modules inside `deepspeed.zero.Init`: each parameter is split across ranks as it is made.

    skip_init: also skip weight init (the weights are loaded right after). The parameter dtype is
    DeepSpeed's (bf16 with `training.bf16`), which the engine requires of partitioned weights.
    """
    import deepspeed
    from transformers import initialization
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    _quiet_deepspeed_collectives()
    with ExitStack() as stack:
        if skip_init:
            stack.enter_context(initialization.no_init_weights())
        stack.enter_context(prevent_arange_dtype_change())
        stack.enter_context(deepspeed.zero.Init(config_dict_or_path=deepspeed_config()))
        yield


def initialize_partitioned(model: nn.Module) -> None:
    """Run the model's own weight init again on gathered weights, on rank 0, then share the result.

    Inside zero.Init each module is built whole and then partitioned, so construction draws from
    the random generator exactly as in one process; `post_init` then runs on the empty local
    shards and draws nothing. Repeating that init here, module by module in the same order, starts
    from the generator state one process's `post_init` starts from, and gives the same weights.
    """
    from transformers.integrations.deepspeed import initialize_weights_zero3

    for module in model.modules():
        module._is_hf_initialized = False  # set by the first (empty) pass; it would skip this one
    initialize_weights_zero3(model)


def load_partitioned(model: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Fill one partitioned parameter from `tensor`, which only rank 0 needs to hold.

    The parameter is gathered whole on every rank for the copy and re-partitioned on exit with
    rank 0's values, so peak memory is one parameter, never the model.
    """
    import deepspeed

    param = model.get_parameter(name)
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if rank() == 0:
            param.copy_(tensor)


def register_moe_leaves(model: nn.Module) -> int:
    """Mark every MoE block a ZeRO-3 leaf; returns how many. Call before the engine is built.

    A leaf gathers all of its parameters (router, every expert, their adapters) when it starts and
    releases them when it ends; ZeRO-3 puts no hooks inside it. Without that, ZeRO-3 hooks every
    submodule and expects all ranks to run the same submodules in the same order: an MoE that calls
    an expert's module only when tokens chose it makes ranks that route differently wait on each
    other for ever (DeepSpeed #4808), or, with DeepSpeed 0.19, fail its order check after the first
    step. mixtune's stacked experts run the same modules on every rank, but adapters, quantised or
    swapped expert layers may not; the leaf also makes one gather per layer instead of one per
    submodule, and hides the router's dataclass output that ZeRO-3's backward hooks cannot read.
    """
    from deepspeed.utils import set_z3_leaf_modules

    _quiet_deepspeed_collectives()
    return len(set_z3_leaf_modules(model, [MoEBlock]))


def leaf_count(model: nn.Module) -> int:
    """How many MoE blocks are ZeRO-3 leaves."""
    return sum(1 for m in model.modules() if isinstance(m, MoEBlock) and getattr(m, "_z3_leaf", False))


def zero3_summary(model: nn.Module) -> str:
    """The start-up line for a ZeRO-3 run: leaf registration and how the weights are held."""
    leaves = leaf_count(model)
    blocks = sum(1 for m in model.modules() if isinstance(m, MoEBlock))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if leaves != blocks:
        return (
            f"WARNING: only {leaves} of {blocks} MoE blocks are ZeRO-3 leaves; ranks whose tokens choose "
            "different experts may hang"
        )
    return (
        f"MoE block registered as a ZeRO-3 leaf in all {leaves} layers (all experts of a layer gathered "
        f"together); weights partitioned across ranks at load, {dtype}"
    )
