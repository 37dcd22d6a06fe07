"""Launched helper for R7: ranks whose tokens choose different experts train under ZeRO-3, no hang.

    accelerate launch --config_file configs/cpu_zero3.yaml --num_processes 2 \
        -m tests.distributed.divergent_routing OUT_DIR [--per-expert] [--no-leaf]

A small Mixtral is rigged so that, in every layer, the router sends token ids below V/2 to experts
0-3 and the others to experts 4-7, and rank r only ever feeds ids of its own half: rank 0's
experts 4-7 and rank 1's experts 0-3 see no token at all. The model is loaded (partitioned),
adapted and registered as ZeRO-3 leaves by mixtune's own set-up (`build_model`), then trained by
the Trainer on DeepSpeed's engine. Rank 0 writes OUT_DIR/routing.json: the experts each rank
used per layer and the steps completed.

mixtune's experts are stacked (one parameter per projection for all experts), so every rank calls
the same modules whatever its routing. --per-expert swaps in the layout that made ZeRO-3 hang for
transformers' Mixtral (DeepSpeed #4808): one module per expert, called only when it has tokens, so
the ranks call different modules. It trains every weight (no LoRA); the router stays frozen.
--no-leaf undoes the leaf registration before the engine exists, to see what it prevents.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from mixtune.distributed import leaf_count
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.model.moe import MoEBlock
from mixtune.model.router import TopKRouter
from mixtune.recipe import load_recipe
from mixtune.train.setup import build_model, shutdown

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
SEQ_LEN, EXAMPLES = 16, 64
# The residual-stream dimension that carries "which half of the vocabulary" to every router.
SIGNAL_DIM = 0


def rigged_model(directory: Path) -> None:
    """Save a model whose routers split the experts by the sign of one hidden dimension."""
    torch.manual_seed(0)
    config = MixtralConfig.preset("tiny", **SHAPE)
    model = MixtralForCausalLM(config)
    V, E = config.vocab_size, config.num_local_experts
    half_sign_V = torch.where(torch.arange(V) < V // 2, 1.0, -1.0)
    group_sign_E = torch.where(torch.arange(E) < E // 2, 1.0, -1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, SIGNAL_DIM] = 4.0 * half_sign_V
        for layer in model.model.layers:
            # Nothing writes to the signal dimension, so it reaches every layer's router unchanged.
            layer.self_attn.o_proj.weight[SIGNAL_DIM] = 0.0
            layer.mlp.experts.down_proj[:, SIGNAL_DIM, :] = 0.0
            layer.mlp.router.proj.weight[:, SIGNAL_DIM] = 5.0 * group_sign_E
    model.save_pretrained(directory)


class ExpertUse:
    """Counts, per layer, the tokens each expert received on this rank (forward hooks on routers)."""

    def __init__(self, model: torch.nn.Module):
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.counts_LE = torch.zeros(len(routers), routers[0].num_experts, dtype=torch.long)
        for layer, router in enumerate(routers):
            router.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, routing) -> None:
            ids = routing.expert_ids.reshape(-1).cpu()
            self.counts_LE[layer] += torch.bincount(ids, minlength=self.counts_LE.shape[1])

        return hook


class Expert(nn.Module):
    """One SwiGLU expert with its own weights."""

    def __init__(self, gate_up_FD: torch.Tensor, down_DI: torch.Tensor):
        super().__init__()
        self.gate_up = nn.Parameter(gate_up_FD)
        self.down = nn.Parameter(down_DI)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        gate_NI, up_NI = (x_ND @ self.gate_up.T).chunk(2, dim=-1)
        return (nn.functional.silu(gate_NI) * up_NI) @ self.down.T


class PerExpertModules(nn.Module):
    """The experts as E modules, each called only when some token chose it (transformers' layout)."""

    def __init__(self, experts: list[Expert]):
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token_N, choice_N = torch.where(expert_ids_TK == e)
            if token_N.numel() == 0:
                continue  # an idle expert's module never runs: the call pattern follows the routing
            y_ND = expert(x_TD[token_N]) * weights_TK[token_N, choice_N, None].to(x_TD.dtype)
            out_TD = out_TD.index_add(0, token_N, y_ND)
        return out_TD


def use_per_expert_modules(model: nn.Module) -> None:
    """Replace each block's stacked experts with per-expert modules holding the same weights."""
    import deepspeed

    for block in [m for m in model.modules() if isinstance(m, MoEBlock)]:
        stacked = block.experts
        with deepspeed.zero.GatheredParameters([stacked.gate_up_proj, stacked.down_proj]):
            experts = [
                Expert(stacked.gate_up_proj.data[e].clone(), stacked.down_proj.data[e].clone())
                for e in range(stacked.num_experts)
            ]
        # New plain parameters: DeepSpeed partitions them when it builds the engine.
        block.experts = PerExpertModules(experts)


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Shift each rank's ids into its own half of the vocabulary."""
    offset = dist.get_rank() * (SHAPE["vocab_size"] // 2)
    input_ids = torch.tensor([row["input_ids"] for row in rows]) + offset
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    leaf, per_expert = "--no-leaf" not in argv, "--per-expert" in argv
    overrides = [
        f"training.output_dir={out}",
        "training.max_steps=4",
        "training.per_device_train_batch_size=4",
        "training.learning_rate=1e-3",
        "training.warmup_steps=0",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "training.logging_steps=1",
        "training.ddp_backend=gloo",
        "training.remove_unused_columns=false",
        "logging.wandb=false",
        "router.policy=frozen",
    ]
    overrides += ["lora.enabled=false"] if per_expert else ["lora.enabled=true", "lora.r=4"]
    # Building the trainer config starts the process group and tells transformers about ZeRO-3.
    recipe = load_recipe("recipes/tiny/sft.yaml", "sft", overrides)
    checkpoint = out / "rigged"
    if dist.get_rank() == 0:
        rigged_model(checkpoint)
    dist.barrier()
    recipe.model.name_or_path = str(checkpoint)
    model = build_model(recipe)  # the real set-up: partitioned load, adapters, leaf registration
    if per_expert:
        use_per_expert_modules(model)
    if not leaf:
        from deepspeed.utils import unset_z3_leaf_modules

        unset_z3_leaf_modules(model, [MoEBlock])
    # Measured, not the flag echoed: what the engine will see.
    blocks = sum(isinstance(m, MoEBlock) for m in model.modules())
    leaf_registered = blocks > 0 and leaf_count(model) == blocks
    use = ExpertUse(model)
    half = SHAPE["vocab_size"] // 2
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, half, (SEQ_LEN,), generator=generator).tolist()}
        for _ in range(EXAMPLES)
    ]
    trainer = Trainer(model=model, args=recipe.training, train_dataset=rows, data_collator=collate)
    trainer.train()

    gathered = [torch.zeros_like(use.counts_LE) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, use.counts_LE)
    if dist.get_rank() == 0:
        used = [
            [[e for e, n in enumerate(layer.tolist()) if n > 0] for layer in counts] for counts in gathered
        ]
        report = {
            "steps": trainer.state.global_step,
            "leaf": leaf_registered,
            "per_expert": per_expert,
            "experts_used": used,
        }
        (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"divergent routing: {report}", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
