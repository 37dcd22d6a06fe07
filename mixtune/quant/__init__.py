"""QLoRA for mixtune's Mixtral: 4-bit NF4 attention and experts through bitsandbytes, and their memory."""

from .memory import memory_summary, weight_memory
from .nf4_experts import NF4Experts, NF4ExpertStack
from .quantize import is_quantized, quantize_layer_4bit, quantize_model_4bit

__all__ = [
    "NF4ExpertStack",
    "NF4Experts",
    "is_quantized",
    "memory_summary",
    "quantize_layer_4bit",
    "quantize_model_4bit",
    "weight_memory",
]
