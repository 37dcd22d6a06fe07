"""Answer a question file, multi-turn, in FastChat's model_answer format (to be judged elsewhere).

    python -m mixtune.answer MODEL_DIR --questions FILE.jsonl --out ANSWERS.jsonl
                             [--max-new-tokens N] [--temperature T] [--batch-size B] [--limit N]

Question rows are MT-Bench's ({"question_id", "category", "turns": [...]}), or a single-turn
{"prompt": ...} or {"instruction": ..., "input": ...}. Turn k is asked with every earlier turn and
the model's own earlier answers in the history, as FastChat's gen_model_answer does, so the output
can go straight to FastChat's llm_judge:

    {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}

Questions are answered in batches (one generate call per turn per batch) and each finished row is
appended at once, so an interrupted run resumes where it stopped: question_ids already in --out are
skipped. Greedy by default; with --temperature every batch samples from --seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixtune.chat import build_prompt_ids
from mixtune.generate import generate
from mixtune.inference import base_config, load_for_inference


@dataclass(frozen=True)
class Question:
    """One row of the question file; `where` is "file:line" for messages."""

    question_id: Any
    category: str
    turns: list[str]
    where: str


def read_questions(path: str | Path) -> list[Question]:
    """Parse and check a question file; a bad row raises ValueError naming file:line."""
    path = Path(path)
    questions, seen = [], {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from None
            question = _question(row, where, default_id=number)
            if question.question_id in seen:
                raise ValueError(
                    f"{where}: question_id {question.question_id!r} already used at {seen[question.question_id]}"
                )
            seen[question.question_id] = where
            questions.append(question)
    return questions


def _question(row: Any, where: str, default_id: int) -> Question:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: turns must be a non-empty list of strings, got {turns!r:.80}")
    elif "prompt" in row or "instruction" in row:
        key = "prompt" if "prompt" in row else "instruction"
        turns = [row[key]]
        extra = row.get("input")
        if key == "instruction" and isinstance(extra, str) and extra.strip():
            turns = [f"{row[key]}\n\n{extra}"]  # Alpaca's instruction + input
    else:
        raise ValueError(f"{where}: no question: expected turns (MT-Bench), prompt or instruction")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise ValueError(f"{where}: turn {i + 1} must be a non-empty string, got {turn!r:.80}")
    question_id = row.get("question_id", row.get("id", default_id))
    return Question(question_id, str(row.get("category", "")), list(turns), where)


def answered_ids(out: Path) -> set:
    """question_ids already in the output file. A last line cut short by a kill is removed."""
    if not out.exists():
        return set()
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    done = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines) and not line.endswith("\n"):
                out.write_text("".join(lines[:-1]), encoding="utf-8")
                print(
                    f"[{out}:{number}: dropped a half-written row; it will be answered again]",
                    file=sys.stderr,
                )
                break
            raise ValueError(f"{out}:{number}: not an answer row, so this file cannot be resumed") from None
    return done


def answer_batch(model, tokenizer, questions: list[Question], **settings: Any) -> list[list[str]]:
    """Each question's answers, turn by turn; one batched generate call per turn.

    settings: generate's max_new_tokens, temperature, top_p, seed.
    """
    answers: list[list[str]] = [[] for _ in questions]
    positions = base_config(model).max_position_embeddings
    for turn in range(max(len(q.turns) for q in questions)):
        rows = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        prompts = []
        for i in rows:
            history = []
            for asked, said in zip(questions[i].turns[:turn], answers[i], strict=True):
                history += [{"role": "user", "content": asked}, {"role": "assistant", "content": said}]
            ids = build_prompt_ids(
                tokenizer, [*history, {"role": "user", "content": questions[i].turns[turn]}]
            )
            if len(ids) + settings["max_new_tokens"] > positions:
                raise ValueError(
                    f"{questions[i].where}: turn {turn + 1} takes {len(ids)} tokens; with "
                    f"{settings['max_new_tokens']} new ones it overflows the model's {positions} positions"
                )
            prompts.append(ids)
        outputs = generate(model, prompts, eos_token_id=tokenizer.eos_token_id, **settings)
        for i, new in zip(rows, outputs, strict=True):
            answers[i].append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def answer_row(question: Question, turns: list[str], model_id: str) -> dict[str, Any]:
    """A FastChat model_answer row. answer_id is a hash of its content, so a rerun gives the same id."""
    key = json.dumps([model_id, question.question_id, turns], ensure_ascii=False)
    answer_id = hashlib.sha256(key.encode("utf-8")).hexdigest()[:22]  # shortuuid's length, as FastChat's
    return {
        "question_id": question.question_id,
        "answer_id": answer_id,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mixtune.answer", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a mixtune model, export or adapter directory")
    parser.add_argument("--questions", required=True, type=Path, help="JSONL question file")
    parser.add_argument("--out", required=True, type=Path, help="JSONL answer file (appended to; resumable)")
    parser.add_argument("--model-id", default=None, help="model_id in the rows (default: the directory name)")
    parser.add_argument(
        "--max-new-tokens", type=_positive, default=1024, help="per turn (FastChat's default)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive, default=8, help="questions per generate call")
    parser.add_argument(
        "--limit", type=_positive, default=None, help="only the first N questions of the file"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        questions = read_questions(args.questions)[: args.limit]
        done = answered_ids(args.out)
        todo = [q for q in questions if q.question_id not in done]
        print(
            f"{len(questions) - len(todo)} of {len(questions)} questions already in {args.out}",
            file=sys.stderr,
        )
        if not todo:
            return 0
        model, tokenizer = load_for_inference(args.model_dir, args.dtype, args.device)
        model_id = args.model_id or Path(args.model_dir).resolve().name
        settings = dict(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as out:
            for start in range(0, len(todo), args.batch_size):
                batch, began = todo[start : start + args.batch_size], time.perf_counter()
                for question, turns in zip(
                    batch, answer_batch(model, tokenizer, batch, **settings), strict=True
                ):
                    out.write(json.dumps(answer_row(question, turns, model_id), ensure_ascii=False) + "\n")
                out.flush()  # a finished batch survives an interrupt; resuming starts after it
                print(
                    f"answered {start + len(batch)}/{len(todo)} ({time.perf_counter() - began:.1f} s for this batch)",
                    file=sys.stderr,
                )
    except (OSError, ValueError) as err:
        print(f"mixtune.answer: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
