"""GPU paths: run only where CUDA is available (a lent H100 in this project; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from mixtune.model import MixtralForCausalLM
from mixtune.model.experts import GroupedExperts, experts_reference
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_grouped_mm_bf16_matches_the_loop_oracle():
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 512).cuda().to(torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 7, (1024, 2), device="cuda")  # expert 7 idle
    weights = torch.rand(1024, 2, device="cuda").softmax(-1)
    out = experts(x, ids, weights)
    ref = experts_reference(experts, x, ids, weights)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), [x, experts.gate_up_proj])
    ref_grads = torch.autograd.grad(ref.float().square().sum(), [x, experts.gate_up_proj])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_bf16_model_on_gpu_matches_fp32_on_cpu():
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config(hidden_size=128, intermediate_size=256)).eval()
    ids = torch.randint(3, 500, (2, 16))
    want = model(ids).logits
    got = model.cuda().to(torch.bfloat16)(ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)
