"""The end-to-end pair for B3-B5: mixtune's Mixtral and transformers' on the same weights, with LoRA.

The batch is SFT-shaped: 256-token rows whose second half is the assistant's answer, labels on the
answer only. Each side trains the way it does in practice: mixtune through its SFT objective (LM
head only where a label is, plus its router losses), transformers through the model's own loss
with its balance loss on (as TRL turns it on for MoE models).
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralForCausalLM as HFMixtral

from bench.common import LORA_RANK, SMALL_MODEL
from mixtune.lora import apply_lora, make_lora_config
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.train.objective import RouterLossConfig, sft_objective

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_pair(seed: int = 0) -> tuple[MixtralForCausalLM, HFMixtral]:
    torch.manual_seed(seed)
    ours = MixtralForCausalLM(MixtralConfig(**SMALL_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = HFMixtral.from_pretrained(tmp)
    hf.config._experts_implementation = "grouped_mm"  # transformers 5's default and fastest on CPU here
    hf.config.output_router_logits = True
    return ours, hf


def mixtune_lora(model, experts: bool):
    targets = ATTENTION + (["w1", "w2", "w3"] if experts else [])
    return apply_lora(model, make_lora_config(targets, LORA_RANK, 2 * LORA_RANK))


def hf_lora(model, experts: bool):
    params = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=ATTENTION, target_parameters=params
    )
    return get_peft_model(model, config)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SMALL_MODEL["vocab_size"], (4, 256), generator=gen)
    labels = ids.clone()
    labels[:, :128] = -100  # the prompt carries no loss
    return {"input_ids": ids, "labels": labels}


ROUTER = RouterLossConfig(balance_coef=0.02, z_loss_coef=0.001)


def training_step(model, optimizer, inputs) -> None:
    """One LoRA step through each implementation's training loss, backward, AdamW."""
    if isinstance(model.get_base_model(), MixtralForCausalLM):
        loss = sft_objective(model, inputs, ROUTER, SMALL_MODEL["num_experts_per_tok"]).loss
    else:
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
