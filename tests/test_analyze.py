"""Routing analysis: the random baselines analytically and by sampling, a forced router, the CLI on real domains."""

from __future__ import annotations

import json

import pytest
import torch

from mixtune import analyze
from mixtune.analysis import RoutingStats, random_baselines
from mixtune.analysis.route import routing_stats
from mixtune.model import MixtralForCausalLM
from mixtune.tokenizer import load_tokenizer, save_tokenizer
from tests.conftest import tiny_config


def test_random_baselines_are_the_closed_forms():
    first, topk = random_baselines(8, 2)
    assert first == 0.125
    assert topk == pytest.approx(13 / 28) and round(100 * topk, 1) == 46.4  # 1 - C(6,2)/C(8,2)
    assert random_baselines(4, 2) == pytest.approx((0.25, 5 / 6))  # 1 - C(2,2)/C(4,2)
    assert random_baselines(8, 1) == pytest.approx((0.125, 0.125))  # top-1: both definitions agree
    assert random_baselines(3, 2)[1] == 1.0  # two 2-sets of 3 experts always share one


@pytest.mark.parametrize(("E", "k"), [(8, 2), (16, 4)])
def test_uniform_random_routing_meets_the_baselines(E, k):
    torch.manual_seed(0)
    stats = RoutingStats(num_layers=2, num_experts=E, top_k=k)
    for _ in range(4):
        stats.add(torch.rand(2, 10_000, E).topk(k, dim=-1).indices)
    first, topk = random_baselines(E, k)
    for layer in stats.layers():
        assert layer.first_repeat == pytest.approx(first, abs=0.01)
        assert layer.topk_repeat == pytest.approx(topk, abs=0.01)
        assert max(layer.first_share) == pytest.approx(1 / E, abs=0.01)


def forced_model(E: int = 8) -> MixtralForCausalLM:
    """Layer 0 routes token v to experts (v mod E, v+1 mod E), in that order.

    Attention's output projection is zero, so the router sees the (normalised) embedding; the
    embedding puts 2 on dimension v mod E and 1 on v+1 mod E, and router row e reads dimension e.
    """
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config(num_local_experts=E)).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        v = torch.arange(emb.shape[0])
        emb[v, v % E] = 2.0
        emb[v, (v + 1) % E] = 1.0
        router = layer.mlp.router.proj.weight
        router.zero_()
        router[torch.arange(E), torch.arange(E)] = 1.0
    return model


def test_forced_router_gives_the_repetition_it_was_built_for():
    E = 8
    climbing = list(range(3, 35))  # consecutive tokens move one expert along: top-2 sets always overlap
    pairs = [0, 0, 4, 4, 0, 0, 4, 4, 9, 9]  # equal neighbours repeat; 0 and 4 share nothing
    # Falling: the next token's second choice is the previous token's first. The sets share an
    # expert (the paper's "first or second choice"), though the next first choice is not in the
    # previous top-2: this tells the two readings of the definition apart.
    falling = [30, 29, 28, 27, 26]
    stats = routing_stats(forced_model(E), [climbing, pairs, falling], batch_size=2)
    # Oracle: the definitions applied by hand to the routing the weights force.
    first_same = topk_shared = n_pairs = 0
    counts = [0] * E
    for seq in (climbing, pairs, falling):
        for t, token in enumerate(seq):
            counts[token % E] += 1
            if t:
                prev = seq[t - 1]
                n_pairs += 1
                first_same += prev % E == token % E
                topk_shared += bool({prev % E, (prev + 1) % E} & {token % E, (token + 1) % E})
    layer0 = stats.layers()[0]
    assert layer0.first_repeat == pytest.approx(first_same / n_pairs)
    assert layer0.topk_repeat == pytest.approx(topk_shared / n_pairs)
    assert (first_same, topk_shared, n_pairs) == (5, 40, 44)
    assert layer0.first_share == pytest.approx([c / sum(counts) for c in counts])
    # The padded second sequence routes as it would alone.
    alone = routing_stats(forced_model(E), [pairs], batch_size=1).layers()[0]
    assert alone.first_repeat == pytest.approx(5 / 9)


@pytest.fixture
def model_dir(tmp_path):
    """A small random Mixtral with the real 32k vocabulary and its tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config(vocab_size=32000, hidden_size=32, num_local_experts=8))
    model.save_pretrained(tmp_path / "model")
    save_tokenizer(load_tokenizer(), tmp_path / "model")
    return tmp_path / "model"


def test_cli_on_three_domains_compared_with_itself(shared_data, model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    domains = [
        f"math={shared_data / 'sft_gsm8k.jsonl'}",
        f"code={shared_data / 'sft_gpteacher.jsonl'}",
        f"dialogue={shared_data / 'pref_hh_harmless.jsonl'}",
    ]
    args = [
        str(model_dir),
        "--data",
        *domains,
        "--limit",
        "3",
        "--max-length",
        "96",
        "--compare",
        str(model_dir),
    ]
    assert analyze.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first or second choice 46.4%" in printed and "Table 5" in printed
    report = json.loads((out / "analysis.json").read_text())
    assert report["random_baseline"]["topk_repeat"] == pytest.approx(13 / 28)
    assert {name: d["kind"] for name, d in report["domains"].items()} == {
        "math": "sft",
        "code": "sft",
        "dialogue": "dpo",
    }
    for domain in report["domains"].values():
        assert domain["sequences"] == 3 and 0 < domain["tokens"] <= 3 * 96
        assert len(domain["layers"]) == 2 and sum(domain["layers"][0]["topk_share"]) == pytest.approx(1.0)
        # The same model on the same ids: every delta is exactly zero.
        assert all(d["first_repeat"] == 0 and d["topk_share_tv"] == 0 for d in domain["delta"])
    for name in ("repetition.png", "shares.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
