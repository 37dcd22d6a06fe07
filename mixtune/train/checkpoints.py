"""Trainer checkpoints that are complete or ignored.

The Trainer writes `checkpoint-N/` in place, file by file and from every rank, so a process killed
halfway leaves a directory that looks like a checkpoint. mixtune wraps each save in a transaction
(mixtune.train.trainer_base runs the steps):
1. a leftover `checkpoint-N/` (partial, or from an earlier run) is removed before N is saved;
2. every rank writes its files (the Trainer's own save);
3. after a barrier the main process fsyncs every file and writes `COMPLETE` last: JSON with the
   step and every file's size, written under a temporary name, fsynced, renamed into place;
4. only then are old checkpoints rotated (save_total_limit), counting complete ones only, so the
   newest complete checkpoint is never deleted.
A checkpoint without `COMPLETE`, or whose files do not match it, is never resumed from.

    python -m mixtune.train.checkpoints OUTPUT_DIR   # each checkpoint: complete, partial or damaged
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import torch

from mixtune.model.weights import CheckpointError

COMPLETE = "COMPLETE"
PREFIX = "checkpoint-"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")
# Files whose CRC-32s are read in full on verification; beyond this only their zip directory is
# checked, since reading hundreds of GB at every resume would cost more than the loader itself.
CRC_LIMIT_BYTES = 4 << 30
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Classes DeepSpeed 0.19 pickles into its optimizer states (seen in ZeRO-3 checkpoints).
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)

logger = logging.getLogger("mixtune.checkpoints")


def step_of(path: str | Path) -> int | None:
    """N for a `checkpoint-N` directory name, else None."""
    match = _STEP.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N/` directory in output_dir, oldest step first."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE).is_file()


def _files(checkpoint: Path) -> dict[str, int]:
    """Relative path -> size of every file under the checkpoint, the marker and temporaries excluded."""
    out = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != COMPLETE and not path.name.startswith(".COMPLETE"):
            out[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_complete(checkpoint: str | Path, step: int) -> Path:
    """Mark a fully written checkpoint complete: call after every rank has finished writing it."""
    checkpoint = Path(checkpoint)
    files = _files(checkpoint)
    for name in files:  # the data must be on disk before the marker that vouches for it
        _fsync(checkpoint / name)
    for directory in {(checkpoint / name).parent for name in files}:
        _fsync(directory)
    marker = checkpoint / COMPLETE
    tmp = checkpoint / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, marker)
    _fsync(checkpoint)
    return marker


def _check_safetensors(path: Path) -> None:
    """Header readable and the file as long as the header says (catches truncation)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header of {header_len} bytes in {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{path}: safetensors file is {size} bytes but its header describes {8 + header_len + end}"
        )


def _check_torch_file(path: Path) -> None:
    """A torch.save zip archive: directory readable, CRC-32s right (up to CRC_LIMIT_BYTES)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if path.stat().st_size <= CRC_LIMIT_BYTES and torch.serialization.get_crc32_options():
                bad = archive.testzip()
                if bad is not None:
                    raise CheckpointError(f"{path}: corrupt (CRC-32 mismatch in record {bad})")
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path}: not a readable torch.save archive, truncated or corrupt ({e})"
        ) from None


def verify(checkpoint: str | Path) -> None:
    """Raise CheckpointError naming the file when a checkpoint is partial, truncated or corrupt.

    Checks: the COMPLETE marker; every file it lists exists with its recorded size; safetensors
    headers agree with the file length; torch.save archives have a readable directory and right
    CRC-32s; JSON files parse. A bit flip inside safetensors data passes (safetensors has no checksum).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    marker = checkpoint / COMPLETE
    if not marker.is_file():
        raise CheckpointError(
            f"{checkpoint}: no {COMPLETE} marker, so it may be partial (a save that was interrupted) or "
            "written by something other than mixtune; it is never resumed from"
        )
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: unreadable ({e})") from None
    for name, size in listed.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {COMPLETE})")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path}: {path.stat().st_size} bytes, but {COMPLETE} recorded {size}: truncated or changed"
            )
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix in TORCH_SUFFIXES:
            _check_torch_file(path)
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError as e:
                raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def unsafe_pickles(checkpoint: str | Path) -> dict[Path, list[str]]:
    """torch.save files whose pickles name globals that `torch.load(weights_only=True)` would refuse.

    Read from each pickle's opcodes without loading it (torch's own scanner, which also fails on
    any opcode outside the plain-data set; such a file is reported as unscannable). The allowlist
    is torch's plus the numpy types transformers allows for RNG state. `training_args.bin` is left
    out: the Trainer never loads it.
    """
    from transformers.trainer_pt_utils import safe_globals

    found = {}
    for path in sorted(Path(checkpoint).rglob("*")):
        if path.suffix not in TORCH_SUFFIXES or path.name == "training_args.bin" or not path.is_file():
            continue
        try:
            with safe_globals():
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # not a torch archive, or opcodes the scanner does not accept
            names = [f"<unscannable: {e}>"]
        if names:
            found[path] = sorted(names)
    return found


def deepspeed_refusals(names: list[str], path: Path) -> list[str]:
    """Of the globals a DeepSpeed file names, those to refuse; unseen deepspeed.* ones only warn."""
    unknown = [n for n in names if n not in DEEPSPEED_GLOBALS]
    refused = [n for n in unknown if not n.startswith("deepspeed.")]
    if unseen := [n for n in unknown if n not in refused]:
        logger.warning("checkpoints: %s names DeepSpeed classes mixtune has not seen: %s", path, unseen)
    return refused


def refuse_unsafe_pickles(checkpoint: str | Path, deepspeed: bool = False) -> None:
    """CheckpointError naming the first file whose pickle could run code when loaded.

    DeepSpeed loads its own files (`global_step*/`) with weights_only=False. Those may name the
    DeepSpeed classes it writes itself (DEEPSPEED_GLOBALS); any other deepspeed.* name is allowed
    with a warning, and anything else (os, subprocess, builtins, ...) is refused.
    """
    checkpoint = Path(checkpoint)
    for path, names in unsafe_pickles(checkpoint).items():
        if deepspeed and any(p.startswith("global_step") for p in path.relative_to(checkpoint).parts[:-1]):
            names = deepspeed_refusals(names, path)
        if names:
            raise CheckpointError(
                f"{path}: refused: its pickle names {', '.join(names[:5])}, which loading with "
                "weights_only=True rejects and loading without it would call (it can run code); "
                "resume only from checkpoints written by your own runs"
            )


def newest_complete(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was passed over."""
    passed_over = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            verify(checkpoint)
            return checkpoint, passed_over
        except CheckpointError as e:
            passed_over.append(str(e))
    return None, passed_over


def remove_stale(checkpoint: str | Path) -> bool:
    """Remove a directory about to be saved into (a partial or earlier run's checkpoint)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        return False
    kind = "complete checkpoint from an earlier run" if is_complete(checkpoint) else "partial checkpoint"
    logger.warning("checkpoints: removing %s %s before saving this step again", kind, checkpoint)
    shutil.rmtree(checkpoint)
    return True


def rotate(output_dir: str | Path, limit: int | None, keep: str | Path | None = None) -> list[Path]:
    """Apply save_total_limit over complete checkpoints; partial ones older than the newest complete go too.

    The newest `limit` complete checkpoints stay, and `keep` (the best model checkpoint) with them,
    as the Trainer's own rotation does. Returns the directories removed.
    """
    if not limit or limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    complete = [c for c in checkpoints if is_complete(c)]
    if not complete:
        return []
    kept = set(complete[-limit:])
    if keep is not None and Path(keep).resolve() in {c.resolve() for c in complete}:
        kept |= {c for c in complete if c.resolve() == Path(keep).resolve()}
    newest = step_of(complete[-1])
    doomed = [c for c in checkpoints if c not in kept and (c in complete or step_of(c) < newest)]
    for checkpoint in doomed:
        logger.info("checkpoints: deleting %s (save_total_limit %d)", checkpoint, limit)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return doomed


def main(argv: list[str] | None = None) -> int:
    """Print each checkpoint's state; exit 1 when none is usable."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mixtune.train.checkpoints OUTPUT_DIR", file=sys.stderr)
        return 2
    usable = False
    for checkpoint in list_checkpoints(args[0]):
        try:
            verify(checkpoint)
            print(f"{checkpoint}: complete")
            usable = True
        except CheckpointError as e:
            print(f"{checkpoint}: not usable: {e}")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
