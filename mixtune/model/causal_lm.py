"""The Mixtral causal language model, speaking the Hugging Face contract.

It is a `transformers.PreTrainedModel` so TRL, PEFT, Accelerate and DeepSpeed treat it like any
causal LM; the layers themselves are mixtune's (see attention.py, router.py, experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils import ModelOutput

from .cache import KVCache
from .config import MixtralConfig
from .decoder import DecoderLayer, RMSNorm
from .experts import GroupedExperts
from .mask import training_mask
from .rope import rope_cos_sin


@dataclass
class MixtralOutput(ModelOutput):
    """Like transformers' MoeCausalLMOutputWithPast.

    router_logits: one (B*T, E) fp32 tensor per layer, returned when output_router_logits=True.
    aux_loss: transformers' balance loss (pooled over layers), for drop-in compatibility; mixtune's
    trainers use the per-layer losses in mixtune.model.router instead.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: KVCache | None = None


@dataclass
class BackboneOutput(ModelOutput):
    """(B, T, D) final hidden states and one (B*T, E) router-logit tensor per layer."""

    last_hidden_state: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class MixtralBackbone(nn.Module):
    """Embeddings, decoder layers, final norm: (B, T) ids -> (B, T, D) hidden states.

    Returned as `last_hidden_state`, the name TRL's fused log-prob head reads from `base_model`.
    """

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        **kwargs,
    ) -> BackboneOutput:
        B, T = input_ids.shape
        if position_ids is None:
            start = past_key_values.seen if past_key_values is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x_BTD = self.embed_tokens(input_ids)
        rope = rope_cos_sin(position_ids, self.config.head_size, self.config.rope_base, x_BTD.dtype)
        mask = None
        if past_key_values is None:
            mask = training_mask(attention_mask, position_ids, T, self.config.sliding_window, x_BTD.device)
        elif attention_mask is not None:
            # Padding (e.g. a left-padded prompt) is hidden from later tokens by giving it position -1.
            position_ids = position_ids.masked_fill(attention_mask[:, -T:] == 0, -1)
        router_logits = []
        for layer in self.layers:
            x_BTD, logits = layer(x_BTD, rope, mask, position_ids, past_key_values=past_key_values)
            router_logits.append(logits)
        if past_key_values is not None:
            past_key_values.advance(position_ids)
        return BackboneOutput(self.norm(x_BTD), tuple(router_logits))


class MixtralForCausalLM(PreTrainedModel):
    """Mixtral with a language-model head.

    forward(input_ids, attention_mask=None, position_ids=None, labels=None, output_router_logits=False)
    returns loss, logits, aux_loss and router_logits like transformers' causal LMs.
    """

    config_class = MixtralConfig
    config: MixtralConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        self.model = MixtralBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Trainers read and set token ids here; generation itself is mixtune.generate's.
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear layers (router included), embeddings, norms
        if isinstance(module, GroupedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        past_key_values: KVCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MixtralOutput:
        """input_ids (B, T) -> logits (B, T, V) (or the positions `logits_to_keep` selects).

        labels (B, T) are shifted inside, -100 ignored, as in transformers; `num_items_in_batch`
        (passed by the Trainer) normalises the loss over a whole accumulated batch.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        backbone = self.model(input_ids, attention_mask, position_ids, past_key_values)
        hidden_BTD, router_logits = backbone.last_hidden_state, backbone.router_logits
        logits = self.lm_head(slice_logits_to_keep(hidden_BTD, logits_to_keep))

        loss = None
        if labels is not None:
            num_items = kwargs.get("num_items_in_batch")
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items)
        aux_loss = None
        if output_router_logits and past_key_values is None:  # a training quantity; not while generating
            aux_loss = load_balancing_loss_func(
                router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return MixtralOutput(
            loss=loss,
            logits=logits,
            aux_loss=aux_loss,
            router_logits=router_logits if output_router_logits else None,
            past_key_values=past_key_values,
        )

    @classmethod
    def can_generate(cls) -> bool:
        # Generation goes through mixtune.generate (our own KV cache), not transformers' GenerationMixin.
        return False

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # PEFT's causal-LM wrapper looks this up when it wraps a model; it is never called by mixtune.
        raise NotImplementedError("mixtune models generate with mixtune.generate.generate()")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        **config_overrides,
    ) -> MixtralForCausalLM:
        """Load a local Mixtral checkpoint (classic or fused layout, safetensors only)."""
        from .weights import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(
        self,
        save_directory: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        is_main_process: bool = True,
        **kwargs,
    ) -> None:
        """Write config.json and classic-layout sharded safetensors (what every consumer reads)."""
        from .weights import save_pretrained

        if is_main_process:
            save_pretrained(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)
