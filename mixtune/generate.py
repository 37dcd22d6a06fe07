"""Text generation with a KV cache: chunked prefill, then one token at a time.

With a sliding window the cache is a rolling buffer of `sliding_window` slots (see
mixtune.model.cache), so memory stays fixed however long the conversation grows. Prompts are
prefilled in chunks (the window size by default, as in the Mixtral reference code) so a long prompt
never builds one prompt-by-prompt attention matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixtune.model.cache import KVCache


def _base_config(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _pick(logits_BV: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = (logits_BV.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    eos_token_id: int | None = 2,
    temperature: float = 0.0,
    top_p: float = 1.0,
    prefill_chunk: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns only the new ids, without the eos.

    Greedy when temperature is 0. Works on a plain mixtune model or a PEFT-wrapped one.
    """
    config = _base_config(model)
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if longest == 0:
        raise ValueError("generate: every prompt needs at least one token")

    # Left-pad so every row's next token lands in the same column; padding gets position -1.
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, -1)

    window = config.sliding_window
    capacity = window if window is not None else longest + max_new_tokens
    cache = KVCache(
        batch, config.num_hidden_layers, config.num_key_value_heads, config.head_size, capacity, dtype, device
    )
    chunk = prefill_chunk or window or longest
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    try:
        for start in range(0, longest, chunk):
            stop = min(start + chunk, longest)
            out = model(
                input_ids=ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop].clamp(min=0),
                past_key_values=cache,
                logits_to_keep=1,
            )
        next_pos = positions.max(dim=1).values + 1
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            token = _pick(out.logits[:, -1], temperature, top_p, generator)
            for row in range(batch):
                if not done[row]:
                    if eos_token_id is not None and int(token[row]) == eos_token_id:
                        done[row] = True
                    else:
                        new_tokens[row].append(int(token[row]))
            if bool(done.all()):
                break
            mask = torch.cat((mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)), dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                logits_to_keep=1,
            )
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return new_tokens
