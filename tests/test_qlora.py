"""QLoRA: NF4 attention and experts through bitsandbytes, LoRA on top, the SFT entry point with it.

The reference for a 4-bit model is the same model in full precision holding the *dequantised*
weights: the two must agree to float tolerance (forward and LoRA gradients). Against the original
full-precision model only a loose bound holds: that gap is NF4's own error.
"""

from __future__ import annotations

import copy
import json
import re

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from safetensors.torch import load_file
from torch import nn

from mixtune import sft
from mixtune.lora import apply_lora, load_adapter, make_lora_config
from mixtune.model import MixtralForCausalLM
from mixtune.model.experts import GroupedExperts, experts_reference
from mixtune.quant import NF4Experts, NF4ExpertStack, quantize_model_4bit, weight_memory
from mixtune.quant import nf4_experts as nf4_module
from mixtune.quant.memory import memory_summary, mixtral_component_params, nf4_bits_per_param
from mixtune.recipe import load_recipe
from mixtune.train.model_loading import load_base_model
from tests.conftest import REPO, tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
IDS = torch.tensor(
    [[1, 7, 99, 301, 42, 5, 88, 260, 17, 3, 411, 64], [1, 500, 2, 8, 77, 140, 9, 33, 300, 6, 12, 90]]
)


def full_model(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_config()).eval()


def quantized(model: MixtralForCausalLM) -> MixtralForCausalLM:
    return quantize_model_4bit(copy.deepcopy(model), torch.float32)


def dequantized(qmodel: MixtralForCausalLM, like: MixtralForCausalLM) -> MixtralForCausalLM:
    """A full-precision model holding the 4-bit model's dequantised weights: what the 4-bit one computes."""
    dense = copy.deepcopy(like)
    for q_layer, layer in zip(qmodel.model.layers, dense.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = getattr(q_layer.self_attn, name).weight
            getattr(layer.self_attn, name).weight.data = dequantize_4bit(weight.data, weight.quant_state)
        layer.mlp.experts = q_layer.mlp.experts.dequantized()
    return dense


def lora(model, seed: int = 1):
    """LoRA on every target with a non-zero B, so the adapter changes the output from the start."""
    torch.manual_seed(seed)
    return apply_lora(model, make_lora_config(TARGETS, r=4, alpha=8, init_lora_weights=False))


# --- the experts ------------------------------------------------------------------------------------


def random_experts(E: int = 4, D: int = 64, I: int = 96) -> GroupedExperts:
    experts = GroupedExperts(E, D, I)
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    return experts


def routing(T: int, E: int, K: int = 2, unused: tuple[int, ...] = ()):
    torch.manual_seed(3)
    logits = torch.randn(T, E)
    logits[:, list(unused)] = -1e9  # experts no token chooses
    top, ids = logits.topk(K, dim=-1)
    return ids, top.softmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_experts_equal_dense_and_loop_oracle_on_dequantised_weights(dtype):
    dense = random_experts().to(dtype)
    nf4 = NF4Experts(dense, dtype)
    x = torch.randn(40, 64, dtype=dtype)
    ids, weights = routing(40, 4)
    deq = nf4.dequantized()
    assert deq.gate_up_proj.dtype == dtype
    # NF4 itself: close to the original weights, but not equal (it is quantised).
    err = (deq.gate_up_proj - dense.gate_up_proj).float().norm() / dense.gate_up_proj.float().norm()
    assert 0.01 < err < 0.15
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        y = nf4(x, ids, weights)
        torch.testing.assert_close(y, deq(x, ids, weights), **tol)
        torch.testing.assert_close(y, experts_reference(deq, x, ids, weights), **tol)


def test_nf4_experts_dequantise_one_expert_per_routed_group(monkeypatch):
    """Only experts that received tokens are touched, one 4-bit matmul each, never the whole stack."""
    nf4 = NF4Experts(random_experts(E=6), torch.float32)
    calls = []
    real = nf4_module.bnb.matmul_4bit
    monkeypatch.setattr(
        nf4_module.bnb, "matmul_4bit", lambda x, B, **kw: calls.append(B.shape) or real(x, B, **kw)
    )
    monkeypatch.setattr(NF4ExpertStack, "dequantize", lambda self: pytest.fail("whole stack dequantised"))
    ids, weights = routing(30, 6, unused=(1, 4))
    x = torch.randn(30, 64, requires_grad=True)
    nf4(x, ids, weights).sum().backward()
    assert len(calls) == 2 * 4  # gate_up and down for each of the 4 routed experts
    assert all(len(shape) == 1 for shape in calls)  # one expert's packed codes, not the (E, ...) stack
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_nf4_statistics_follow_the_codes_across_devices_and_ignore_dtype_casts():
    nf4 = NF4Experts(random_experts(), torch.float32).to(torch.bfloat16)  # a model-wide cast
    state = nf4.down_proj.quant_states[0]
    assert nf4.down_proj.packed.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
    moved = copy.deepcopy(nf4).to("meta")
    for stack in (moved.gate_up_proj, moved.down_proj):
        for state in stack.quant_states:
            tensors = (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)
            assert all(t.device.type == "meta" for t in tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantising_on_the_gpu_trains_there():
    model = full_model().to(torch.bfloat16)
    qmodel = quantize_model_4bit(copy.deepcopy(model), torch.bfloat16, device="cuda")
    assert all(t.device.type == "cuda" for t in [*qmodel.parameters(), *qmodel.buffers()])
    assert qmodel.model.layers[1].mlp.experts.gate_up_proj.quant_states[0].absmax.device.type == "cuda"
    ids = IDS.cuda()
    with torch.no_grad():
        exact = dequantized(qmodel, model).cuda()(ids).logits.float()
        torch.testing.assert_close(qmodel(ids).logits.float(), exact, atol=0.1, rtol=0.05)
    peft_model = lora(qmodel)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# --- the quantised model ----------------------------------------------------------------------------


def test_quantised_model_is_quantised_and_close_to_full_precision():
    model = full_model()
    qmodel = quantized(model)
    layer = qmodel.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        projection = getattr(layer.self_attn, name)
        assert isinstance(projection, bnb.nn.Linear4bit) and projection.weight.dtype == torch.uint8
        assert projection.weight.quant_state.quant_type == "nf4" and projection.weight.quant_state.nested
        assert projection.weight.quant_state.blocksize == 64
    assert isinstance(layer.mlp.experts, NF4Experts)
    assert layer.mlp.experts.gate_up_proj.packed.dtype == torch.uint8
    assert all(s.nested and s.blocksize == 64 for s in layer.mlp.experts.down_proj.quant_states)
    # Kept in full precision, as QLoRA does.
    assert (
        type(layer.mlp.router.proj.weight) is nn.Parameter
        and layer.mlp.router.proj.weight.dtype == torch.float32
    )
    assert type(qmodel.lm_head) is nn.Linear and type(qmodel.model.embed_tokens) is nn.Embedding
    # Base weights are frozen storage: nothing 4-bit is a parameter that wants a gradient.
    assert not any(p.requires_grad for n, p in qmodel.named_parameters() if p.dtype == torch.uint8)
    assert not [n for n, _ in qmodel.named_parameters() if ".experts." in n]

    full, quant = weight_memory(model), weight_memory(qmodel)
    for component in ("attention", "experts"):
        assert quant[component].params == full[component].params == quant[component].quantized
        assert quant[component].bytes < 0.35 * full[component].bytes  # full is fp32 here
    assert quant["embeddings/head"].bytes == full["embeddings/head"].bytes
    assert re.search(r"attention [\d.]+ MB nf4, experts [\d.]+ MB nf4", memory_summary(qmodel))

    with torch.no_grad():
        reference, logits = model(IDS).logits, qmodel(IDS).logits
        exact = dequantized(qmodel, model)(IDS).logits
    torch.testing.assert_close(logits, exact, atol=1e-4, rtol=1e-4)  # the 4-bit model computes this
    gap = (logits - reference).abs().max() / reference.abs().max()
    assert 1e-4 < gap < 0.3, gap  # NF4 error: present, bounded
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.95


def test_lora_gradients_reach_adapters_only_and_match_the_dequantised_model():
    model = full_model()
    qmodel = quantized(model)
    q_peft, d_peft = lora(qmodel), lora(dequantized(qmodel, model))
    # PEFT's own bitsandbytes LoRA layer on attention, mixtune's grouped one on the experts.
    assert isinstance(q_peft.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    for peft_model in (q_peft, d_peft):
        peft_model.train()
        peft_model(IDS, labels=IDS).loss.backward()
    trainable = {n: p for n, p in q_peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".self_attn." in n for n in trainable) and any(".experts.w2_proj." in n for n in trainable)
    reference = dict(d_peft.named_parameters())
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, reference[name].grad, atol=1e-4, rtol=1e-3)
    assert all(p.grad is None for n, p in q_peft.named_parameters() if not p.requires_grad)


def test_adapter_from_qlora_loads_on_full_precision_and_requantised_bases(tmp_path):
    model = full_model()
    q_peft = lora(quantized(model))
    q_peft.save_pretrained(tmp_path / "qlora")
    full_peft = lora(copy.deepcopy(model))
    full_peft.save_pretrained(tmp_path / "lora")
    # The same tensors under the same names as an adapter trained in full precision.
    q_keys = load_file(tmp_path / "qlora" / "adapter_model.safetensors").keys()
    assert q_keys == load_file(tmp_path / "lora" / "adapter_model.safetensors").keys()

    with torch.no_grad():
        tuned = q_peft(IDS).logits
        on_requantised = load_adapter(quantized(model), tmp_path / "qlora")(IDS).logits
        on_full = load_adapter(copy.deepcopy(model), tmp_path / "qlora")(IDS).logits
        base = model(IDS).logits
    torch.testing.assert_close(on_requantised, tuned)  # quantisation is deterministic
    gap = (on_full - tuned).abs().max() / tuned.abs().max()
    assert gap < 0.3, gap  # only NF4's error separates them
    assert (on_full - base).abs().max() > 1e-3  # and the adapter did arrive


@pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit")  # PEFT, on attention, before experts refuse
def test_merging_into_4bit_experts_is_refused_with_the_way_out():
    q_peft = lora(quantized(full_model()))
    with pytest.raises(RuntimeError, match="full-precision copy of the base"):
        q_peft.base_model.model.model.layers[0].mlp.experts.w1_proj.merge()
    with pytest.raises(RuntimeError, match="load_in_4bit: false"):
        q_peft.merge_and_unload()


def test_component_counts_add_up_to_the_model_and_nf4_bits():
    config = tiny_config()
    counted = mixtral_component_params(config)
    measured = weight_memory(MixtralForCausalLM(config))
    assert {c: m.params for c, m in measured.items()} == counted
    assert nf4_bits_per_param() == pytest.approx(4.127, abs=5e-4)
    assert nf4_bits_per_param(double_quant=False) == 4.5


# --- the entry point --------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_sft_learns_and_its_adapter_loads_on_the_full_precision_base(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sft"
    args = [
        "recipes/tiny/sft.yaml",
        f"training.output_dir={out}",
        "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}",
        "model.load_in_4bit=true",
        "lora.enabled=true",
        "lora.r=8",
        "router.policy=frozen",
        "training.max_steps=12",
        "training.logging_steps=2",
        "training.eval_strategy=no",
        "training.save_strategy=no",
        "logging.wandb=false",
    ]
    assert sft.main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[0], losses
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(".experts.w2_proj." in k for k in adapter) and any(".self_attn.q_proj." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: all moved

    recipe = load_recipe(out / "recipe.yaml", "sft", [f"training.output_dir={tmp_path / 'x'}"])
    assert recipe.model.load_in_4bit
    requantised = load_base_model(recipe.model)
    assert isinstance(requantised.model.layers[0].mlp.experts, NF4Experts)
    recipe.model.load_in_4bit = False
    base = load_base_model(recipe.model)
    tuned = load_adapter(copy.deepcopy(base), out)
    with torch.no_grad():
        assert (tuned(IDS).logits - base(IDS).logits).abs().max() > 1e-4
