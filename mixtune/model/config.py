"""Mixtral configuration: transformers' own `MixtralConfig` (the same config.json), checked early.

We subclass rather than re-declare so every config.json written for Mixtral reads unchanged and
every config mixtune writes loads in transformers' `MixtralForCausalLM`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import MixtralConfig as _HFMixtralConfig

# Published Mixtral shapes (the config.json of the v0.1 checkpoints) and a tiny one for tests and
# the demo. The tiny size is the one DEMO_CALIBRATION measured learning in minutes on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
    ),
    "mixtral-8x22b": dict(
        vocab_size=32000,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=56,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=65536,
        rope_theta=1e6,
        sliding_window=None,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        sliding_window=None,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.02,
        tie_word_embeddings=False,
    ),
}


# Fields transformers types as plain float. Its configs check types strictly, and refuse the int that
# `router_aux_loss_coef: 0` becomes in YAML or JSON (or a trainer copies in) deep inside huggingface_hub.
_FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(_HFMixtralConfig) if f.type is float)


class MixtralConfig(_HFMixtralConfig):
    """A Mixtral config.json, refused early when its shapes cannot make a model."""

    def __setattr__(self, name: str, value: Any) -> None:
        if type(value) is int and name in _FLOAT_FIELDS:
            value = float(value)  # a whole number where a float belongs: 0 means 0.0
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_config(self)

    @property
    def head_size(self) -> int:
        """Width of one attention head (`head_dim` when set, else hidden / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_base(self) -> float:
        """RoPE theta, wherever this config.json put it."""
        return float(self.rope_parameters["rope_theta"])

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MixtralConfig:
        """A named shape (`mixtral-8x7b`, `mixtral-8x22b`, `tiny`), optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown Mixtral preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def check_config(config: _HFMixtralConfig) -> None:
    """Raise ValueError, saying why, for a config no Mixtral can be built from."""
    problems = []
    positive = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
    )
    for name in positive:
        if getattr(config, name) is None or getattr(config, name) < 1:
            problems.append(f"{name} must be a positive integer, got {getattr(config, name)}")
    if problems:
        raise ValueError("invalid Mixtral config: " + "; ".join(problems))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if config.head_dim is None and config.hidden_size % heads:
        problems.append(
            f"num_attention_heads ({heads}) does not divide hidden_size ({config.hidden_size}), "
            "and no head_dim is set"
        )
    if heads % kv_heads:
        problems.append(
            f"num_key_value_heads ({kv_heads}) does not divide num_attention_heads ({heads}): "
            "grouped-query attention shares each key/value head among a whole number of query heads"
        )
    if config.num_experts_per_tok > config.num_local_experts:
        problems.append(
            f"num_experts_per_tok ({config.num_experts_per_tok}) is larger than "
            f"num_local_experts ({config.num_local_experts}): the router cannot pick more experts than exist"
        )
    if config.sliding_window is not None and config.sliding_window < 1:
        problems.append(f"sliding_window must be null or a positive integer, got {config.sliding_window}")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} is not supported (Mixtral experts use silu)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        problems.append(f"rope_type {rope_type!r} is not supported (Mixtral uses plain RoPE)")
    if problems:
        raise ValueError("invalid Mixtral config: " + "; ".join(problems))
