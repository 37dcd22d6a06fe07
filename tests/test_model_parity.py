"""mixtune's Mixtral against transformers' MixtralForCausalLM: same weights, same numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM as HFMixtral

from mixtune.model import MixtralForCausalLM
from tests.conftest import tiny_config

CONFIGS = {
    "top2-e4": dict(num_local_experts=4, num_experts_per_tok=2),
    "top1-e4": dict(num_local_experts=4, num_experts_per_tok=1),
    "top2-e8": dict(num_local_experts=8, num_experts_per_tok=2),
    "top2-e8-window": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=5),
    "top1-e8-window-tied": dict(
        num_local_experts=8, num_experts_per_tok=1, sliding_window=3, tie_word_embeddings=True
    ),
}


def hf_name(name: str) -> str:
    """mixtune parameter name -> transformers 5 parameter name."""
    return name.replace("mlp.router.proj.weight", "mlp.gate.weight")


def pair_from_hf(tmp_path, overrides, seed=0):
    """A random transformers Mixtral, saved by transformers, loaded by mixtune."""
    torch.manual_seed(seed)
    hf = HFMixtral(tiny_config(**overrides)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return hf, ours


def batch(vocab, padded: str | None):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 11))
    mask = torch.ones_like(ids)
    if padded == "right":
        mask[0, 7:] = 0
        mask[2, 9:] = 0
    elif padded == "left":
        mask[0, :4] = 0
        mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("padded", [None, "right", "left"])
def test_logits_aux_loss_and_grads_match(tmp_path, name, padded):
    hf, ours = pair_from_hf(tmp_path, CONFIGS[name])
    ids, mask = batch(hf.config.vocab_size, padded)
    # A label is predicted from the previous position: keep only those whose predictor is real
    # (what padding leaves at a pad position is arbitrary in any implementation).
    predictor_real = torch.cat((torch.zeros_like(mask[:, :1]), mask[:, :-1]), dim=1)
    labels = ids.masked_fill((mask == 0) | (predictor_real == 0), -100)
    out_hf = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)

    real = mask.bool()
    torch.testing.assert_close(out.logits[real], out_hf.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, out_hf.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, out_hf.loss, atol=1e-5, rtol=0)
    for ours_logits, hf_logits in zip(out.router_logits, out_hf.router_logits, strict=True):
        torch.testing.assert_close(
            ours_logits[real.reshape(-1)], hf_logits[real.reshape(-1)], atol=1e-5, rtol=0
        )

    out.loss.backward()
    out_hf.loss.backward()
    hf_params = dict(hf.named_parameters())
    for pname, param in ours.named_parameters():
        ref = hf_params[hf_name(pname)].grad
        torch.testing.assert_close(param.grad, ref, atol=1e-5, rtol=1e-4, msg=f"gradient of {pname}")


@pytest.mark.parametrize("name", ["top2-e8", "top2-e8-window"])
def test_mixtune_checkpoint_loads_in_transformers(tmp_path, name):
    torch.manual_seed(3)
    ours = MixtralForCausalLM(tiny_config(**CONFIGS[name])).eval()
    ours.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()  # really sharded
    hf = HFMixtral.from_pretrained(tmp_path / "ours").eval()
    ids, mask = batch(ours.config.vocab_size, "right")
    real = mask.bool()
    torch.testing.assert_close(
        ours(ids, attention_mask=mask).logits[real],
        hf(ids, attention_mask=mask).logits[real],
        atol=1e-5,
        rtol=0,
    )


def test_save_reload_is_exact(tmp_path):
    torch.manual_seed(4)
    ours = MixtralForCausalLM(tiny_config()).eval()
    ours.save_pretrained(tmp_path / "a")
    again = MixtralForCausalLM.from_pretrained(tmp_path / "a").eval()
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bf16_forward_close_to_transformers(tmp_path):
    """In bf16 the router still decides in fp32; outputs agree with transformers to bf16 precision."""
    hf, ours = pair_from_hf(tmp_path, CONFIGS["top2-e8"])
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, _ = batch(hf.config.vocab_size, None)
    out = ours(ids, output_router_logits=True)
    assert out.router_logits[0].dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), hf(ids).logits.float(), atol=0.05, rtol=0.05)
