"""LoRA for mixtune's Mixtral: attention through PEFT, experts through a grouped LoRA layer of our own."""

from .apply import TARGET_MODULES, apply_lora, load_adapter, make_lora_config, set_router_trainable

__all__ = ["TARGET_MODULES", "apply_lora", "load_adapter", "make_lora_config", "set_router_trainable"]
