"""Chat with a mixtune model in the terminal.

    python -m mixtune.chat MODEL_DIR [--max-new-tokens N] [--temperature T] [--top-p P]
                           [--system TEXT] [--prompt TEXT]

MODEL_DIR is anything `load_for_inference` reads: an export, a full fine-tuning output or an
adapter directory. Every turn re-encodes the whole conversation in the Mixtral v1 format (the
format the model was trained on) and generates greedily unless --temperature is set.

- Interactive (a terminal): /reset starts a new conversation, /quit or Ctrl-D leaves, and Ctrl-C
  while the model answers drops that answer and keeps the program.
- Piped (stdin not a terminal): each line is a user message, commands included.
- `--prompt TEXT`: answer one message and exit.
Replies go to stdout and everything else (banner, notices) to stderr, so output can be captured.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mixtune.chat_format import encode_prompt
from mixtune.generate import generate
from mixtune.inference import base_config, load_for_inference

Message = dict[str, Any]


def build_prompt_ids(tokenizer, history: list[Message], system: str | None = None) -> list[int]:
    """Token ids of a conversation (user/assistant turns ending with a user turn), ready to generate.

    An empty assistant reply, which a model gives when its first token is </s>, is encoded as that
    </s> alone. The chat format refuses empty turns, but every turn is its own SentencePiece call,
    so the prompt is the part before the empty reply, </s>, then the part after (without its <s>).
    """
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    blank = next(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and not str(m["content"]).strip()),
        None,
    )
    if blank is None:
        return encode_prompt(tokenizer, messages)
    head = encode_prompt(tokenizer, messages[:blank])
    tail = build_prompt_ids(tokenizer, messages[blank + 1 :])
    return head + [tokenizer.eos_token_id] + tail[1:]


def fit_history(
    tokenizer, history: list[Message], limit: int, system: str | None = None
) -> tuple[list[int], int]:
    """(prompt ids, exchanges dropped): the oldest user+assistant pairs go until the prompt has <= limit tokens.

    Raises ValueError when the last user message alone does not fit.
    """
    dropped = 0
    while True:
        ids = build_prompt_ids(tokenizer, history[2 * dropped :], system)
        if len(ids) <= limit:
            return ids, dropped
        if 2 * dropped + 1 >= len(history):
            raise ValueError(
                f"this message takes {len(ids)} tokens; at most {limit} fit with room for the answer"
            )
        dropped += 1


class Chat:
    """One conversation with a model: `ask` answers and remembers, `reset` forgets."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        system: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.system, self.seed = model, tokenizer, system, seed
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        # Positions past the model's trained context have never been seen: keep prompt + answer inside.
        self.limit = base_config(model).max_position_embeddings - max_new_tokens
        if self.limit <= 0:
            raise ValueError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                f"{base_config(model).max_position_embeddings} positions"
            )
        self.history: list[Message] = []

    def ask(self, text: str) -> tuple[str, int]:
        """(reply, exchanges dropped to fit). On any error or Ctrl-C the history is left as it was."""
        history = [*self.history, {"role": "user", "content": text}]
        ids, dropped = fit_history(self.tokenizer, history, self.limit, self.system)
        new = generate(
            self.model,
            [ids],
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
        )[0]
        reply = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.history = [*history[2 * dropped :], {"role": "assistant", "content": reply}]
        return reply, dropped

    def reset(self) -> None:
        self.history = []


def banner(model_dir: str | Path, chat: Chat) -> str:
    """What is loaded, how it answers, and how to leave."""
    cfg = base_config(chat.model)
    kind = "adapter" if hasattr(chat.model, "get_base_model") else "full model"
    how = "greedy" if chat.temperature <= 0 else f"temperature {chat.temperature}, top-p {chat.top_p}"
    return (
        f"mixtune chat: {model_dir} ({kind}; {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"top-{cfg.num_experts_per_tok}, {cfg.max_position_embeddings} positions)\n"
        f"  {how}, up to {chat.max_new_tokens} new tokens"
        + (f"; system: {chat.system!r}" if chat.system else "")
        + "\n  /reset starts a new conversation, /quit or Ctrl-D leaves, Ctrl-C stops an answer"
    )


def terminal_lines() -> Iterator[str]:
    """Lines typed at the prompt; Ctrl-C on an empty prompt is a hint, not an exit (as in Python's REPL)."""
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (imported for its side effect: arrow keys and history in input())
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", file=sys.stderr)


def run_loop(chat: Chat, lines: Iterable[str]) -> None:
    """Answer each line in turn; /reset and /quit are commands. Replies to stdout, notices to stderr."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            print("[new conversation]", file=sys.stderr)
            continue
        try:
            reply, dropped = chat.ask(text)
        except KeyboardInterrupt:
            print("\n[stopped; that question is forgotten]", file=sys.stderr)
            continue
        except ValueError as err:  # too long for the context; the conversation goes on without it
            print(f"[{err}]", file=sys.stderr)
            continue
        if dropped:
            print(f"[dropped the {dropped} oldest exchange(s) to fit the context]", file=sys.stderr)
        print(reply if reply else "[empty reply]", end="\n\n", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixtune.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a mixtune model, export or adapter directory")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--system", default=None, help="a system prompt, folded into the first user turn")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_for_inference(args.model_dir, args.dtype, args.device)
        settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        chat = Chat(model, tokenizer, system=args.system, seed=args.seed, **settings)
        if args.prompt is not None:
            print(chat.ask(args.prompt)[0])
            return 0
    except (OSError, ValueError) as err:
        print(f"mixtune.chat: {err}", file=sys.stderr)
        return 2
    print(banner(args.model_dir, chat), file=sys.stderr)
    run_loop(chat, terminal_lines() if sys.stdin.isatty() else sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
