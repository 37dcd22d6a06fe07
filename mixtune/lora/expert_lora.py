"""LoRA on one projection of every expert, computed inside the grouped expert product.

Each expert e gets its own rank-r pair (A_e: r x in, B_e: out x r). On the tokens grouped by
expert the term is (x @ A_e^T) @ B_e^T * scale, two thin grouped products, so W + BA is never
formed (transformers 5 + PEFT rebuilds every expert's full weight each forward) and the frozen
W gets no gradient. This is a PEFT custom LoRA layer, so PEFT still owns the life cycle: adapters
save and load as PEFT directories, merge and unmerge, and `disable_adapter()` turns them off.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from mixtune.model.experts import ExpertProjection
from mixtune.model.grouped import RoutingPlan, grouped_linear


class StackedLoraWeight(nn.Module):
    """One (E, rows, cols) parameter: every expert's A (or B) matrix for one adapter."""

    def __init__(self, num_experts: int, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, rows, cols))


class ExpertProjectionLora(nn.Module, LoraLayer):
    """PEFT LoRA layer replacing an `ExpertProjection` attachment point."""

    def __init__(
        self,
        base_layer: ExpertProjection,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs,
    ):
        super().__init__()
        with warnings.catch_warnings():
            # PEFT warns that it cannot size an unknown layer type; this layer sizes itself below.
            warnings.simplefilter("ignore", UserWarning)
            LoraLayer.__init__(self, base_layer)
        self.num_experts = base_layer.num_experts
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any
    ) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if config.use_dora or config.lora_bias:
            raise ValueError("expert LoRA supports plain LoRA only (no DoRA, no LoRA bias)")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self.lora_A[adapter_name] = StackedLoraWeight(self.num_experts, r, self.in_features)
        self.lora_B[adapter_name] = StackedLoraWeight(self.num_experts, self.out_features, r)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if adapter_name not in self.lora_A:
            return
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            for e in range(self.num_experts):  # per expert, so fan-in is `in`, as for one nn.Linear
                if init_lora_weights == "gaussian":
                    nn.init.normal_(A[e], std=1 / self.r[adapter_name])
                else:
                    nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
                if init_lora_weights is False:
                    nn.init.kaiming_uniform_(B[e], a=math.sqrt(5))  # tests want a non-trivial adapter
                else:
                    nn.init.zeros_(B[e])  # B = 0: the adapted model starts exactly at the base

    def forward(
        self, x_NI: torch.Tensor, plan: RoutingPlan, *args: Any, **kwargs: Any
    ) -> torch.Tensor | None:
        """The LoRA term (N, out) for tokens grouped as in `plan`, or None when nothing is active."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError("mixed-adapter batches are not supported on expert LoRA")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x_NI, plan)
        if self.merged:
            return self.base_layer(x_NI, plan)
        total = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            x = self.lora_dropout[name](x_NI.to(A.dtype))
            term = grouped_linear(grouped_linear(x, A, plan), B, plan) * self.scaling[name]
            total = term if total is None else total + term
        return None if total is None else total.to(x_NI.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """(E, out, in) = scale * B_e @ A_e, in fp32 and cast back (CPU bf16 matmuls are slow and lossy)."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = torch.bmm(B.float(), A.float()) * self.scaling[adapter]
        base = self.get_base_layer()
        return delta.to(base.compute_dtype if base.quantized else base.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if base.quantized:
            # Adding BA to NF4 codes would need a dequantise-add-requantise round trip that throws
            # most of the adapter away in quantisation error; the export merges in full precision.
            raise RuntimeError(
                f"cannot merge LoRA into the 4-bit experts' {base.name}: merge into a full-precision copy "
                "of the base instead (load the base with model.load_in_4bit: false, load this adapter "
                "onto it with mixtune.lora.load_adapter, then merge)"
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            weight = self.get_base_layer().weight  # a view into the stacked parameter
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(
                    f"merging adapter {name!r} into {self.base_layer.name} gives non-finite weights"
                )
            weight.data.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self.get_base_layer().weight.data.sub_(self.get_delta_weight(name))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
