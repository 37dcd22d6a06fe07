"""mixtune's own Mixtral: config, attention, router, experts, MoE block, decoder, causal LM, weight I/O."""

from .causal_lm import MixtralForCausalLM, MixtralOutput
from .config import PRESETS, MixtralConfig

__all__ = ["PRESETS", "MixtralConfig", "MixtralForCausalLM", "MixtralOutput"]
