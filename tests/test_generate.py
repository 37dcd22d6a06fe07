"""Cached generation equals greedy decoding by full forward passes."""

from __future__ import annotations

import pytest
import torch

from mixtune.generate import generate
from mixtune.model import MixtralForCausalLM
from tests.conftest import tiny_config


def greedy_by_full_forward(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "window,chunk",
    [(None, None), (None, 4), (6, None), (6, 4), (6, 9), (3, 2)],
    ids=["full", "full-chunked", "window", "window-chunk<W", "window-chunk>W", "tiny-window"],
)
def test_cached_generation_matches_full_forward(window, chunk):
    torch.manual_seed(0)
    # Large init so greedy paths depend on the attention pattern (a near-uniform model would
    # emit the same token whatever it attends to, proving nothing).
    model = MixtralForCausalLM(tiny_config(sliding_window=window, initializer_range=0.2)).eval()
    prompts = [[5, 17, 42, 8, 99, 3, 61, 7, 250, 11, 4], [300, 12, 9]]
    steps = 12  # prompt + new tokens run well past the window: the rolling buffer wraps
    got = generate(model, prompts, max_new_tokens=steps, eos_token_id=None, prefill_chunk=chunk)
    for prompt, new in zip(prompts, got, strict=True):
        assert new == greedy_by_full_forward(model, prompt, steps)


def test_cached_logits_match_full_forward_logits():
    torch.manual_seed(1)
    model = MixtralForCausalLM(tiny_config(sliding_window=4, initializer_range=0.2)).eval()
    from mixtune.model.cache import KVCache

    ids = torch.randint(3, 500, (1, 14))
    full = model(ids).logits
    cfg = model.config
    cache = KVCache(1, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size, 4, torch.float32, "cpu")
    pieces = [model(ids[:, s : s + 3], past_key_values=cache).logits for s in range(0, 14, 3)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_generation_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(2)
    model = MixtralForCausalLM(tiny_config()).eval()
    greedy = generate(model, [[5, 6, 7]], max_new_tokens=5, eos_token_id=None)[0]
    stopped = generate(model, [[5, 6, 7]], max_new_tokens=5, eos_token_id=greedy[2])[0]
    assert stopped == greedy[:2]
    a = generate(model, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, eos_token_id=None)
    b = generate(model, [[5, 6, 7]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, eos_token_id=None)
    assert a == b
