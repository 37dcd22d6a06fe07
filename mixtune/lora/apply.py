"""Putting adapters on a mixtune Mixtral, and loading saved ones, through PEFT.

The recipe names targets as Mixtral does (q_proj k_proj v_proj o_proj, and each expert's w1 w2 w3);
they map here to the model's module names. The router is never reached through that list: its
training policy is its own recipe key (frozen, lora or full).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from mixtune.model.experts import ExpertProjection
from mixtune.model.weights import CheckpointError

from .expert_lora import ExpertProjectionLora

ADAPTER_SAFETENSORS = "adapter_model.safetensors"

# recipe target -> module name suffix in mixtune's Mixtral
TARGET_MODULES = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "o_proj": "o_proj",
    "w1": "w1_proj",
    "w2": "w2_proj",
    "w3": "w3_proj",
}
ROUTER_MODULE = "router.proj"
ROUTER_POLICIES = ("frozen", "lora", "full")


def register_expert_lora(config: LoraConfig) -> LoraConfig:
    """Teach PEFT to build mixtune's grouped expert LoRA for the experts' attachment points."""
    config._register_custom_module({ExpertProjection: ExpertProjectionLora})
    return config


def make_lora_config(
    targets: Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    router_policy: str = "frozen",
    init_lora_weights: bool | str = True,
) -> LoraConfig:
    """A PEFT LoraConfig for recipe targets and a router policy."""
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid: {', '.join(TARGET_MODULES)}")
    if router_policy not in ROUTER_POLICIES:
        raise ValueError(f"router policy must be one of {ROUTER_POLICIES}, got {router_policy!r}")
    modules = [TARGET_MODULES[t] for t in targets]
    if router_policy == "lora":
        modules.append(ROUTER_MODULE)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        # "full": the router's own weights train and are saved with the adapter; the original
        # stays untouched underneath, so disable_adapter() (the DPO reference) sees the base router.
        modules_to_save=[ROUTER_MODULE] if router_policy == "full" else None,
        init_lora_weights=init_lora_weights,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return register_expert_lora(config)


def apply_lora(model, config: LoraConfig) -> PeftModel:
    """Wrap the model with a fresh trainable adapter."""
    return get_peft_model(model, register_expert_lora(config))


def load_adapter(model, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"):
    """Load a saved mixtune adapter directory onto a base model.

    Only from adapter_model.safetensors: PEFT would fall back to a pickled adapter_model.bin.
    """
    if not (Path(adapter_dir) / ADAPTER_SAFETENSORS).is_file():
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_SAFETENSORS}; mixtune loads adapter weights from "
            "safetensors only (a pickled adapter_model.bin can run code when loaded)"
        )
    config = register_expert_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(
        model, str(adapter_dir), config=config, is_trainable=is_trainable, adapter_name=adapter_name
    )


def set_router_trainable(model, policy: str) -> None:
    """Without LoRA (full fine-tuning) the router trains only when the policy says `full`."""
    for name, param in model.named_parameters():
        if ".router." in name:
            param.requires_grad_(policy == "full")
