"""The Mixtral 8x7B tokenizer behind the Hugging Face tokenizer interface, built without the hub.

The vocabulary is mistral-common's `tokenizer.model.v1`: SentencePiece BPE, 32,000 pieces,
`<unk>`=0, `<s>`=1, `</s>`=2, no pad piece.

Backend: transformers' `MistralCommonBackend`, which is mistral-common itself behind the HF
interface. The three backends transformers 5.23 offers, measured on 6,500 real conversations
(19,904 message texts from gsm8k, GPTeacher, ShareGPT and HH) against SentencePiece and
mistral-common:

* `TokenizersBackend`, which `LlamaTokenizer` and `AutoTokenizer` build from a .model file: 3,728
  texts and 2,502 conversations come out different. SentencePiece gives whitespace-only pieces the
  lowest score, so `x    "y` is `▁x ▁▁▁ ▁" y`; the converted BPE merges them first: `▁x ▁▁▁▁ " y`.
* `SentencePieceBackend`: exact ids, and 0 of 6,500 differ through a Jinja template that keeps
  the v1 pieces apart. But `decode` returns byte-fallback pieces as text (a newline becomes
  "<0x0A>") and strips spaces. Worse, `AutoTokenizer` ignores it in any directory whose config.json
  says `model_type: mixtral` (every checkpoint we export). transformers sends mixtral to
  `MistralCommonBackend` only when there is a tekken.json, and otherwise to a `TokenizersBackend`
  converted from tokenizer.model; that tokenizer got all 19,904 texts wrong.
* `MistralCommonBackend`: 0 differences for text, chat templates and decoding. It is also the
  class transformers registers for `model_type: mixtral`. `AutoTokenizer` loads it from a directory
  whose tokenizer_config.json names it, whether or not a config.json is there too. Its own
  `save_pretrained` copies only tokenizer.model.v1, so `save_tokenizer` writes that file as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from transformers import AutoTokenizer, MistralCommonBackend

V1_TOKENIZER_FILE = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# Padding must never look like EOS: a collator that masks pad positions in the labels would also
# mask every real </s>, and the model would never learn to stop. <unk> (id 0) is never produced
# by SentencePiece with byte fallback, so it is free to use.
PAD_TOKEN = "<unk>"

# All AutoTokenizer needs in order to choose the exact backend (see the module docstring).
_TOKENIZER_CONFIG = {"tokenizer_class": "MistralCommonBackend"}


def load_tokenizer(path: str | os.PathLike | None = None, *, mode: str = "test") -> MistralCommonBackend:
    """Return the Mixtral v1 tokenizer with `<unk>` (id 0) as its pad token.

    path: None builds it from the file in the mistral-common wheel. A directory loads the
        tokenizer saved there (by `save_tokenizer`, or a bare tokenizer.model.v1 such as a
        Trainer checkpoint's) through `AutoTokenizer`.
    mode: mistral-common's validation mode, which decides what `apply_chat_template` accepts.
        "test" (the default, and what a plain `AutoTokenizer.from_pretrained` gives) takes
        conversations that end with a user turn. "finetuning" takes whole conversations that end
        with an assistant turn.

    Raises FileNotFoundError if the directory holds no tokenizer, and ValueError if it holds
    one other than the exact Mixtral v1 tokenizer.

    Decode with `skip_special_tokens=True`. Without it, this backend returns raw SentencePiece
    pieces ("▁The▁result</s>"), which is mistral-common's KEEP policy. A plain `AutoTokenizer` load
    calls its pad token "<pad>". The id is still 0, but that name is not in the vocabulary, and TRL
    refuses it. Set the pad token here, or set `pad_token="<unk>"` in the trainer config.
    """
    if path is None:
        tokenizer = MistralCommonBackend(tokenizer_path=V1_TOKENIZER_FILE, mode=mode)
    else:
        tokenizer = _load_directory(Path(path), mode)
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def save_tokenizer(tokenizer: MistralCommonBackend, out_dir: str | os.PathLike) -> list[str]:
    """Write `tokenizer` to `out_dir` so `AutoTokenizer.from_pretrained(out_dir)` loads it exactly.

    This works next to a Mixtral config.json as well. Returns the paths written.
    """
    if not isinstance(tokenizer, MistralCommonBackend):
        raise TypeError(
            f"save_tokenizer expects the tokenizer from load_tokenizer, got {type(tokenizer).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [str(p) for p in tokenizer.save_pretrained(out)]
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    return [*written, str(config)]


def _load_directory(directory: Path, mode: str) -> MistralCommonBackend:
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    has_config = (directory / "tokenizer_config.json").is_file()
    has_v1 = (directory / V1_TOKENIZER_FILE.name).is_file()
    if not has_config and not has_v1:
        raise FileNotFoundError(
            f"no tokenizer in {directory}: expected tokenizer_config.json and {V1_TOKENIZER_FILE.name} "
            "(save_tokenizer writes both)"
        )
    try:
        if has_config:
            tokenizer = AutoTokenizer.from_pretrained(directory, mode=mode)
        else:
            # MistralCommonBackend.save_pretrained (so also a Trainer checkpoint) writes only the
            # vocabulary file, which AutoTokenizer cannot place; load that backend directly.
            tokenizer = MistralCommonBackend.from_pretrained(directory, mode=mode)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load a tokenizer from {directory}: {err}") from err
    _require_v1(tokenizer, directory)
    return tokenizer


def _require_v1(tokenizer: object, directory: Path) -> None:
    """Refuse anything that could silently give other ids than mistral-common's v1 encoding."""
    version = None
    if isinstance(tokenizer, MistralCommonBackend):
        version = tokenizer.tokenizer.instruct_tokenizer.tokenizer.version
    if version != TokenizerVersion.v1:
        found = type(tokenizer).__name__ + (f" ({version.value})" if version else "")
        raise ValueError(
            f"the tokenizer in {directory} is {found}, not the exact Mixtral v1 tokenizer "
            "(MistralCommonBackend on tokenizer.model.v1). Use load_tokenizer() for the wheel's "
            "copy, or save_tokenizer() to write a directory that loads it."
        )
