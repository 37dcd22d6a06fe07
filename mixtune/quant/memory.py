"""Weight memory by component, measured on a model and computed for a config.

    python -m mixtune.quant    # the Mixtral 8x7B table, NF4 measured at its shapes, a small model

Components: attention (q/k/v/o), experts, embeddings/head (embed_tokens, lm_head), other (norms,
router) and lora (adapter weights, when present). A 4-bit weight counts as one parameter; its bytes
include the codes and every quantisation statistic bitsandbytes keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .nf4_experts import BLOCKSIZE

COMPONENTS = ("attention", "experts", "embeddings/head", "other", "lora")
NESTED_BLOCKSIZE = 256  # absmax values per fp32 scale in double quantisation (bitsandbytes' fixed size)
GB = 1e9


@dataclass
class ComponentMemory:
    """One component's weights: `params` logical weights, `quantized` of them in 4-bit, `bytes` held."""

    params: int = 0
    quantized: int = 0
    bytes: int = 0

    def full_bytes(self, bytes_per_param: int) -> int:
        """What the component would hold with every weight at `bytes_per_param`."""
        return self.params * bytes_per_param


def nf4_bits_per_param(
    blocksize: int = BLOCKSIZE, double_quant: bool = True, nested_blocksize: int = NESTED_BLOCKSIZE
) -> float:
    """Bits per weight of NF4: the 4-bit code plus its share of the block scale.

    Each block of `blocksize` weights has one absmax scale: fp32 (32 bits) without double
    quantisation; with it, an 8-bit code plus a share of one fp32 scale per `nested_blocksize`
    blocks. Per-tensor constants (the two code tables, one offset) are left out: they vanish for
    large matrices. blocksize 64 with double quantisation: 4 + 8/64 + 32/(64*256) = 4.127.
    """
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


def component_of(name: str) -> str:
    """The component a parameter or module name belongs to (plain or PEFT-wrapped names)."""
    if "lora_" in name:
        return "lora"
    if ".self_attn." in name:
        return "attention"
    if ".experts." in name:
        return "experts"
    if "embed_tokens" in name or "lm_head" in name:
        return "embeddings/head"
    return "other"


def _quantized_storage(module: nn.Module) -> tuple[int, list[torch.Tensor]] | None:
    """(logical weights, every tensor held) for a 4-bit module, None for any other module."""
    import bitsandbytes as bnb

    from .nf4_experts import NF4ExpertStack

    if isinstance(module, bnb.nn.Linear4bit):
        states, codes = [module.weight.quant_state], module.weight
        params = module.in_features * module.out_features
    elif isinstance(module, NF4ExpertStack):
        states, codes = module.quant_states, module.packed
        params = module.num_experts * module.out_features * module.in_features
    else:
        return None
    tensors = [codes]
    for state in states:
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    return params, tensors


def _weights(model: nn.Module) -> Iterator[tuple[str, int, bool, list[torch.Tensor]]]:
    """(name, logical weights, quantised?, tensors) for every weight-holding piece of the model."""
    for name, module in model.named_modules():
        quantized = _quantized_storage(module)
        if quantized is not None:
            yield name, quantized[0], True, quantized[1]
            continue
        for param_name, param in module.named_parameters(recurse=False):
            yield f"{name}.{param_name}", param.numel(), False, [param]


def weight_memory(model: nn.Module) -> dict[str, ComponentMemory]:
    """Weight memory of a model (plain or PEFT-wrapped) by component; shared tensors count once."""
    report = {c: ComponentMemory() for c in COMPONENTS}
    seen: set[tuple[int, int]] = set()
    for name, params, quantized, tensors in _weights(model):
        entry = report[component_of(name)]
        key = (tensors[0].data_ptr(), tensors[0].nbytes)
        if key in seen:  # tied weights (embeddings and lm_head) are one tensor
            continue
        seen.add(key)
        entry.params += params
        entry.quantized += params if quantized else 0
        entry.bytes += sum(t.numel() * t.element_size() for t in tensors)
    return report


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def memory_summary(model: nn.Module) -> str:
    """One line for the start-up banner: weight memory by component, and the same at full precision."""
    report = weight_memory(model)
    full = model.get_input_embeddings().weight.element_size()
    parts = [
        f"{c} {_size(m.bytes)}" + (" nf4" if m.quantized == m.params else "")
        for c, m in report.items()
        if m.params
    ]
    total = sum(m.bytes for m in report.values())
    full_total = sum(m.full_bytes(full) for m in report.values())
    return (
        f"weights {_size(total)} ({', '.join(parts)}); {_size(full_total)} "
        f"at {full * 8}-bit ({total / full_total:.2f}x)"
    )


def mixtral_component_params(config, lora_rank: int = 0) -> dict[str, int]:
    """Parameters per component of a Mixtral config, counted from its shapes (no model built).

    With `lora_rank`, adds the adapters of rank r on q/k/v/o and every expert's w1/w3/w2:
    r * (in + out) per matrix.
    """
    D, I, E, V = config.hidden_size, config.intermediate_size, config.num_local_experts, config.vocab_size
    L = config.num_hidden_layers
    q_out = config.num_attention_heads * config.head_size
    kv_out = config.num_key_value_heads * config.head_size
    attention_shapes = [(q_out, D), (kv_out, D), (kv_out, D), (D, q_out)]
    expert_shapes = [(I, D), (I, D), (D, I)] * E
    heads = 1 if config.tie_word_embeddings else 2
    counts = {
        "attention": L * sum(o * i for o, i in attention_shapes),
        "experts": L * sum(o * i for o, i in expert_shapes),
        "embeddings/head": heads * V * D,
        "other": L * (2 * D + E * D) + D,  # two norms and the router per layer, the final norm
        "lora": L * lora_rank * sum(o + i for o, i in attention_shapes + expert_shapes),
    }
    return counts


def mixtral_memory_table(config, lora_rank: int = 16, full_bytes: int = 2) -> str:
    """A markdown table of weight memory per component: every weight at `full_bytes` vs QLoRA
    (NF4 attention and experts; embeddings, head, norms, router and adapters at `full_bytes`)."""
    bits = nf4_bits_per_param()
    counts = mixtral_component_params(config, lora_rank)
    rows = ["| component | parameters | bf16 GB | QLoRA GB | QLoRA storage |", "|---|---:|---:|---:|---|"]

    def row(label: str, params: int, full: float, qlora: float, how: str = "") -> None:
        rows.append(f"| {label} | {params / 1e9:.3f} B | {full / GB:.2f} | {qlora / GB:.2f} | {how} |")

    full_total = qlora_total = 0.0
    for component in ("attention", "experts", "embeddings/head", "other"):
        params = counts[component]
        quantized = component in ("attention", "experts")
        full, qlora = params * full_bytes, params * (bits / 8 if quantized else full_bytes)
        row(
            component,
            params,
            full,
            qlora,
            f"NF4, {bits:.3f} bits/param" if quantized else f"{full_bytes * 8}-bit",
        )
        full_total, qlora_total = full_total + full, qlora_total + qlora
    row("**base model**", sum(counts.values()) - counts["lora"], full_total, qlora_total)
    adapters = counts["lora"] * full_bytes
    row(f"LoRA r={lora_rank} adapters", counts["lora"], adapters, adapters, f"{full_bytes * 8}-bit")
    row("**base + adapters**", sum(counts.values()), full_total + adapters, qlora_total + adapters)
    return "\n".join(rows)


def measured_table(model: nn.Module, quantized: nn.Module) -> str:
    """A markdown table of one model's weights measured before and after `quantize_model_4bit`."""
    full, after = weight_memory(model), weight_memory(quantized)
    rows = [
        "| component | parameters | full bytes | 4-bit bytes | ratio | bits/param |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for component in COMPONENTS:
        before, now = full[component], after[component]
        if not before.params:
            continue
        rows.append(
            f"| {component} | {before.params:,} | {before.bytes:,} | {now.bytes:,} | "
            f"{now.bytes / before.bytes:.3f} | {8 * now.bytes / now.params:.3f} |"
        )
    total_before = sum(m.bytes for m in full.values())
    total_after = sum(m.bytes for m in after.values())
    rows.append(f"| **total** | | {total_before:,} | {total_after:,} | {total_after / total_before:.3f} | |")
    return "\n".join(rows)


def main() -> None:
    """Print the 8x7B table, NF4 measured at 8x7B matrix shapes, and a small model measured."""
    import copy

    from mixtune.model import MixtralConfig, MixtralForCausalLM

    from .nf4_experts import NF4ExpertStack
    from .quantize import quantize_linear_4bit, quantize_model_4bit

    config = MixtralConfig.preset("mixtral-8x7b")
    print(f"NF4, blocksize {BLOCKSIZE}, double quantisation: {nf4_bits_per_param():.4f} bits/param")
    print(f"(without double quantisation: {nf4_bits_per_param(double_quant=False):.4f})\n")
    print("Mixtral 8x7B (preset mixtral-8x7b), computed from the config:\n")
    print(mixtral_memory_table(config))

    D, I = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_size
    print("\nMeasured at Mixtral 8x7B matrix shapes (one of each, bf16 in):\n")
    print("| matrix | parameters | bytes | bits/param |\n|---|---:|---:|---:|")
    bf16 = torch.bfloat16
    pieces = {
        f"q_proj / o_proj ({D} x {D}), Linear4bit": quantize_linear_4bit(
            nn.Linear(D, D, False, dtype=bf16), bf16
        ),
        f"k_proj / v_proj ({kv} x {D}), Linear4bit": quantize_linear_4bit(
            nn.Linear(D, kv, False, dtype=bf16), bf16
        ),
        f"expert gate_up ({2 * I} x {D}), NF4ExpertStack": NF4ExpertStack(
            torch.randn(1, 2 * I, D, dtype=bf16), bf16
        ),
        f"expert down ({D} x {I}), NF4ExpertStack": NF4ExpertStack(torch.randn(1, D, I, dtype=bf16), bf16),
    }
    for label, module in pieces.items():
        params, tensors = _quantized_storage(module)
        size = sum(t.numel() * t.element_size() for t in tensors)
        print(f"| {label} | {params:,} | {size:,} | {8 * size / params:.4f} |")

    # BENCHMARKS.md's "small" shape, with the real 32,000-token vocabulary.
    small = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = MixtralForCausalLM(MixtralConfig.preset("tiny", **small)).to(dtype)
        quantized = quantize_model_4bit(copy.deepcopy(model), dtype)
        print(
            f"\nMeasured: preset tiny with {small}, {str(dtype).removeprefix('torch.')}, before and after:\n"
        )
        print(measured_table(model, quantized))
