"""The end-to-end pair for B3-B5: mixtune's Mixtral and transformers' on the same weights, with LoRA."""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralForCausalLM as HFMixtral

from bench.common import LORA_RANK, SMALL_MODEL
from mixtune.lora import apply_lora, make_lora_config
from mixtune.model import MixtralConfig, MixtralForCausalLM

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_pair(seed: int = 0) -> tuple[MixtralForCausalLM, HFMixtral]:
    torch.manual_seed(seed)
    ours = MixtralForCausalLM(MixtralConfig(**SMALL_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = HFMixtral.from_pretrained(tmp)
    hf.config._experts_implementation = "grouped_mm"  # transformers 5's default and fastest on CPU here
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
    return {"input_ids": ids, "labels": ids}


def training_step(model, optimizer, inputs) -> None:
    """One LoRA step: full-vocabulary LM loss over every position, backward, AdamW."""
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
