"""Held-out evaluation of the embedded tasks: exact-match answers and preference accuracy.

Used by `make demo` to show that SFT and DPO really change the model; works for any mixtune
model (plain or adapter-wrapped) and the task files in data/tasks/.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from mixtune.chat_format import encode_completion, encode_prompt
from mixtune.generate import generate
from mixtune.tasks import prompt_messages, score


@torch.no_grad()
def answer_accuracy(
    model, tokenizer, rows: Sequence[dict], batch_size: int = 64, max_new_tokens: int = 12
) -> dict[str, float]:
    """Greedy answers to each row's prompt, scored by exact match per task."""
    model.eval()
    predictions: list[str] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, prompt_messages(row)) for row in batch]
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        predictions += [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    return score(rows, predictions)


@torch.no_grad()
def completion_logps(
    model, tokenizer, rows: Sequence[dict], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected completion: two (N,) tensors."""
    model.eval()
    sequences, spans = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        for reply in (row["chosen"][-1]["content"], row["rejected"][-1]["content"]):
            completion = encode_completion(tokenizer, reply)
            sequences.append(prompt + completion)
            spans.append((len(prompt), len(prompt) + len(completion)))
    totals = []
    for start in range(0, len(sequences), batch_size):
        batch, batch_spans = sequences[start : start + batch_size], spans[start : start + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        log_probs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, (a, b) in enumerate(batch_spans):
            # Token t is predicted at position t - 1.
            targets = ids[i, a:b]
            totals.append(log_probs[i, a - 1 : b - 1].gather(1, targets[:, None]).sum())
    logps = torch.stack(totals).view(-1, 2)
    return logps[:, 0], logps[:, 1]


def preference_accuracy(
    chosen: torch.Tensor, rejected: torch.Tensor, rows: Sequence[dict]
) -> dict[str, float]:
    """Fraction of pairs whose chosen completion scores higher, per task and overall ("all")."""
    wins: dict[str, list[bool]] = defaultdict(list)
    for row, c, r in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
        wins[row["task"]].append(c > r)
        wins["all"].append(c > r)
    return {task: sum(w) / len(w) for task, w in sorted(wins.items())}
