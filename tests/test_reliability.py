"""Faults and bad input (../shared/docs/RELIABILITY.md R1-R6, R8, R10, R11; docs/reliability.md).

Every run is the real entry point on the tiny model (hidden 64, 2 layers) and 64 rows, 4 rows per
micro-batch, accumulation 2: 8 optimizer steps are one epoch, so step 4 is mid-epoch. Kills and
signals need a real process (tests/reliability/run_sft.py); everything else runs in this one.
R7 is tests/test_distributed.py, R9 tests/test_dpo.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from mixtune import dpo, sft
from mixtune.data import build_preference_datasets, build_sft_datasets
from mixtune.lora import load_adapter
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.model.weights import CheckpointError
from mixtune.recipe import RecipeError, load_recipe
from mixtune.train import trainer_base
from mixtune.train.checkpoints import (
    COMPLETE,
    deepspeed_refusals,
    is_complete,
    refuse_unsafe_pickles,
    verify,
    write_complete,
)
from mixtune.train.dpo_trainer import MixtuneDPOTrainer
from mixtune.train.model_loading import load_base_model, stage_model_section
from mixtune.train.nonfinite import NonFiniteError, NonFiniteGuard, refuse_unsupported
from mixtune.train.resume import check_recipe, recipe_changes, resolve_checkpoint
from mixtune.train.setup import build_run, build_trainer
from mixtune.train.sft_trainer import MixtuneSFTTrainer
from mixtune.train.signals import PREEMPTED_EXIT_CODE
from mixtune.train.trainer_base import MixtuneTrainerMixin
from tests.conftest import REPO

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"
SHAPE = [
    "logging.wandb=false",
    "data.train.0.limit=64",
    "training.per_device_train_batch_size=4",
    "training.gradient_accumulation_steps=2",
    "training.logging_steps=1",
    "training.eval_strategy=no",
    "training.save_steps=4",
    "training.max_steps=8",
    "training.warmup_steps=2",
]
# LoRA with dropout on attention and an expert projection: resuming must restore the RNG too.
SFT_LORA = ["recipes/tiny/sft.yaml", SMALL, "lora.enabled=true", "router.policy=lora", "lora.dropout=0.1"]
SFT_LORA += ["lora.targets=[q_proj,v_proj,w2]", *SHAPE]
SFT_FULL = ["recipes/tiny/sft.yaml", SMALL, *SHAPE]  # the tiny recipe's own setting: full fine-tuning
DPO_LORA = ["recipes/tiny/dpo.yaml", "lora.dropout=0.1", "lora.targets=[q_proj,v_proj,w2]", *SHAPE]
# Logged every step; everything but these must be identical between a resumed and a straight run.
TIMING = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")

HELPER = REPO / "tests" / "reliability"
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
}


# --- running stages and reading what they wrote ---------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Runs in this process and in subprocesses (OMP_NUM_THREADS=1) use the same thread count, so
    their float reductions happen in the same order and results compare bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def in_repo():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        yield mp


@contextmanager
def recording_samples():
    """Collect the `where` ids of every training micro-batch, in order (they also prove provenance survives)."""
    seen: list[list[str]] = []
    original = MixtuneTrainerMixin.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        seen.append(list(inputs.get("where") or []))
        return original(self, model, inputs, num_items_in_batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MixtuneTrainerMixin, "training_step", spy)
        yield seen


def run_stage(stage: str, base: list[str], out: Path, *extra: str) -> tuple[int, list[list[str]]]:
    """Run the entry point in this process; (exit code, micro-batch sample ids)."""
    entry = {"sft": sft, "dpo": dpo}[stage]
    with in_repo(), recording_samples() as seen:
        code = entry.main([*base, f"training.output_dir={out}", *extra])
    return code, seen


def train_logs(out: Path) -> dict[int, dict]:
    """Per-step training log rows (the last one written for each step), timing left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r and not set(TIMING) & r.keys()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_resumed_equals_straight(resumed: Path, straight: Path, first_step: int, weights_file: str) -> None:
    """Bitwise: every logged value of every step after the resume point, and the saved weights."""
    got, want = train_logs(resumed), train_logs(straight)
    steps = [s for s in want if s >= first_step]
    assert steps and {s: got[s] for s in steps} == {s: want[s] for s in steps}
    assert_same_tensors(weights(resumed / weights_file), weights(straight / weights_file))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()
    return dst


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """A stand-in SFT model for DPO: a small random Mixtral saved as a model directory."""
    path = tmp_path_factory.mktemp("sft_model")
    torch.manual_seed(0)
    MixtralForCausalLM(
        MixtralConfig.preset("tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def straight_lora(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    """The reference run: LoRA SFT, 8 steps straight, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("straight") / "sft"
    code, seen = run_stage("sft", SFT_LORA, out)
    assert code == 0
    return out, seen


# --- R1: resume is exact ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "full"])
def test_r1_sft_resume_is_exact(tmp_path, straight_lora, variant):
    if variant == "lora":
        straight, straight_order = straight_lora
        base, weights_file = SFT_LORA, "adapter_model.safetensors"
    else:  # full fine-tuning: the Trainer's own loader silently left experts and router unrestored
        base, weights_file = SFT_FULL, "model.safetensors"
        straight = tmp_path / "straight"
        code, straight_order = run_stage("sft", base, straight)
        assert code == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    code, order = run_stage("sft", base, resumed, "training.resume_from_checkpoint=latest")
    assert code == 0
    assert order == straight_order[8:]  # the same samples, in the same order, from mid-epoch on
    assert all(where and all(w.startswith("data/tasks/sft_train.jsonl:") for w in where) for where in order)
    assert_resumed_equals_straight(resumed, straight, 5, weights_file)


@pytest.mark.slow
def test_r1_dpo_resume_is_exact(tmp_path, sft_dir):
    base = [*DPO_LORA, f"model.name_or_path={sft_dir}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, straight_order = run_stage("dpo", base, straight)
    assert code == 0
    code, order = run_stage(
        "dpo", base, resumed, f"training.resume_from_checkpoint={straight / 'checkpoint-4'}"
    )
    assert code == 0
    assert order == straight_order[8:]
    assert_resumed_equals_straight(resumed, straight, 5, "adapter_model.safetensors")


# --- R2: checkpoints are complete or ignored -----------------------------------------------------------


def start_sft(out: Path, fault: dict[str, str], *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(HELPER / "run_sft.py"), *SFT_LORA, f"training.output_dir={out}", *extra]
    env = os.environ | ENV | fault | {"MIXTUNE_TEST_READY": str(out.parent / "ready")}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The helper's output once it exits; killed and failed at `timeout`, so a hang frees its core."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not finish within {timeout:.0f} s (a hang?):\n{proc.communicate()[0][-4000:]}")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the fault never fired:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_r2_sigkill_while_saving_then_resume_uses_last_complete(tmp_path, straight_lora, caplog):
    out = tmp_path / "sft"
    proc = start_sft(out, {"MIXTUNE_TEST_HANG_IN_SAVE": "8"}, "training.save_total_limit=1")
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGKILL)  # adapter and optimizer of checkpoint-8 written, the rest not
    proc.communicate()
    assert (out / "checkpoint-8" / "adapter_model.safetensors").is_file()
    assert not is_complete(out / "checkpoint-8") and is_complete(out / "checkpoint-4")

    (out / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        code, _ = run_stage(
            "sft", SFT_LORA, out, "training.resume_from_checkpoint=latest", "training.save_total_limit=1"
        )
    assert code == 0
    assert f"continuing from {out / 'checkpoint-4'}" in caplog.text
    assert "removing partial checkpoint" in caplog.text
    assert_resumed_equals_straight(out, straight_lora[0], 5, "adapter_model.safetensors")
    # checkpoint-8 was written again, whole; only then did retention remove checkpoint-4.
    verify(out / "checkpoint-8")
    assert not (out / "checkpoint-4").exists()


@pytest.mark.slow
def test_r2_retention_never_deletes_the_last_complete_checkpoint(tmp_path, monkeypatch):
    def crash(folder, step):  # the process dies after every file, before the marker
        if step == 8:
            raise KeyboardInterrupt
        return write_complete(folder, step)

    monkeypatch.setattr(trainer_base, "write_complete", crash)
    out = tmp_path / "sft"
    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", SFT_LORA, out, "training.save_total_limit=1")
    # The Trainer's own rotation (inside its save, before COMPLETE exists) would have deleted checkpoint-4.
    assert is_complete(out / "checkpoint-4") and not is_complete(out / "checkpoint-8")
    assert resolve_checkpoint("latest", out) == out / "checkpoint-4"
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        resolve_checkpoint(str(out / "checkpoint-8"), out)


# --- R3: SIGTERM ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_r3_sigterm_checkpoints_at_the_step_end_and_resume_continues(tmp_path, straight_lora, caplog):
    out = tmp_path / "sft"
    proc = start_sft(out, {"MIXTUNE_TEST_SIGTERM_AT": "6"})  # between step 6's two micro-batches
    output = finish(proc, timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    assert "received SIGTERM" in output
    verify(out / "checkpoint-6")  # the step finished, then it was saved, whole
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert not (out / "adapter_model.safetensors").exists()  # no final outputs from a stopped run

    (out / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        code, _ = run_stage("sft", SFT_LORA, out, "training.resume_from_checkpoint=latest")
    assert code == 0 and f"continuing from {out / 'checkpoint-6'}" in caplog.text
    assert_resumed_equals_straight(out, straight_lora[0], 7, "adapter_model.safetensors")


# --- R4: corrupt or truncated checkpoint files ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_r4_truncated_file_named_or_skipped_for_the_previous_checkpoint(
    tmp_path, straight_lora, name, capsys, caplog
):
    out = copy_run(straight_lora[0], tmp_path / "sft")
    damaged = out / "checkpoint-8" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    code, _ = run_stage("sft", SFT_LORA, out, f"training.resume_from_checkpoint={out / 'checkpoint-8'}")
    assert code == 1 and str(damaged) in capsys.readouterr().err

    with caplog.at_level(logging.WARNING):
        code, _ = run_stage("sft", SFT_LORA, out, "training.resume_from_checkpoint=latest")
    assert code == 0
    assert str(damaged) in caplog.text and f"continuing from {out / 'checkpoint-4'}" in caplog.text
    assert_resumed_equals_straight(out, straight_lora[0], 5, "adapter_model.safetensors")


@pytest.mark.slow
def test_r4_same_size_corruption_of_a_torch_file_is_caught(tmp_path, straight_lora):
    checkpoint = shutil.copytree(straight_lora[0] / "checkpoint-4", tmp_path / "checkpoint-4")
    path = checkpoint / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt: corrupt"):
        verify(checkpoint)


# --- R5: NaN/Inf never reaches the optimizer ---------------------------------------------------------------


def make_trainer(stage: str, base: list[str], out: Path, *extra: str, tokenizer_hook=None):
    """What the entry point builds, kept in hand so a test can inject faults and look inside."""
    with in_repo():
        recipe = load_recipe(base[0], stage, [*base[1:], f"training.output_dir={out}", *extra])
        run = build_run(recipe, build_sft_datasets if stage == "sft" else build_preference_datasets)
        if tokenizer_hook is not None:
            tokenizer_hook(run.tokenizer)
        cls = MixtuneSFTTrainer if stage == "sft" else MixtuneDPOTrainer
        return build_trainer(cls, run, eval_dataset=False)


class Snapshots(TrainerCallback):
    """Trainable parameters and optimizer state at the end of each step; micro-batch counter for injection."""

    def __init__(self, trainer):
        self.trainer, self.params, self.optim, self.micro = trainer, {}, {}, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro += 1

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.params[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        self.optim[state.global_step] = {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in self.trainer.optimizer.state_dict()["state"].items()
        }

    def current_params(self):
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad}


def inject(trainer, snapshots, step: int, where: str) -> None:
    """NaN in the loss (embeddings' output) or in one gradient, in the 2nd micro-batch of `step`."""
    armed = lambda: trainer.state.global_step + 1 == step and snapshots.micro == 1  # noqa: E731
    if where == "loss":
        trainer.model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: out * float("nan") if armed() else None
        )
    else:
        param = next(p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n)
        param.register_hook(lambda g: g * float("nan") if armed() else None)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_r5_nan_loss_stops_naming_step_and_samples_before_the_update(tmp_path, sft_dir, stage):
    base = SFT_LORA if stage == "sft" else [*DPO_LORA, f"model.name_or_path={sft_dir}"]
    trainer = make_trainer(stage, base, tmp_path / "out")
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    inject(trainer, snapshots, 3, "loss")
    with recording_samples() as seen, pytest.raises(NonFiniteError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "step 3: non-finite loss" in message and "micro-batch 2:" in message
    named = set(re.findall(r"data/tasks/\S+?\.jsonl:\d+", message))
    assert named == set(seen[5])  # the 6th micro-batch, step 3's second; its first was fine
    assert_same_tensors(snapshots.current_params(), snapshots.params[2])
    assert trainer.state.global_step == 2


@pytest.mark.slow
def test_r5_skip_leaves_parameters_and_optimizer_state_untouched(tmp_path):
    trainer = make_trainer("sft", SFT_LORA, tmp_path / "out", "reliability.on_nonfinite=skip")
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    inject(trainer, snapshots, 3, "gradient")
    trainer.train()
    assert_same_tensors(snapshots.params[3], snapshots.params[2])
    assert snapshots.optim[3].keys() == snapshots.optim[2].keys()
    for key, state in snapshots.optim[3].items():  # AdamW's moments and step counts did not move
        assert_same_tensors(state, snapshots.optim[2][key])
    assert any(not torch.equal(snapshots.params[4][n], snapshots.params[3][n]) for n in snapshots.params[3])
    logs = train_logs(tmp_path / "out")
    assert [logs[s]["nonfinite_skipped"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
    state = json.loads((tmp_path / "out" / "checkpoint-8" / "mixtune_state.json").read_text())
    assert state["nonfinite_skipped_steps"] == [3]


@pytest.mark.slow
def test_r5_skips_over_the_limit_stop_the_run(tmp_path):
    extra = ("reliability.on_nonfinite=skip", "reliability.max_nonfinite_skips=0")
    trainer = make_trainer("sft", SFT_LORA, tmp_path / "out", *extra)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    inject(trainer, snapshots, 2, "gradient")
    with pytest.raises(
        NonFiniteError, match="step 2: non-finite gradient; 1 steps skipped.*max_nonfinite_skips 0"
    ):
        trainer.train()
    assert_same_tensors(snapshots.current_params(), snapshots.params[1])


def test_r5_under_deepspeed_the_loss_is_checked_before_backward_and_skip_is_refused(monkeypatch):
    guard = NonFiniteGuard()
    guard.check_loss_now(torch.tensor(1.5), ["a.jsonl:1"], 4)
    with pytest.raises(NonFiniteError, match=r"step 4: non-finite loss.*a.jsonl:2"):
        guard.check_loss_now(torch.tensor(float("inf")), ["a.jsonl:2"], 4)
    with pytest.raises(RecipeError, match="on_nonfinite: skip is not supported under DeepSpeed"):
        refuse_unsupported("skip", deepspeed=True)
    refuse_unsupported("stop", deepspeed=True)
    # The entry point refuses before the model is built.
    with in_repo():
        recipe = load_recipe("recipes/tiny/sft.yaml", "sft", [SMALL, "reliability.on_nonfinite=skip"])
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        with pytest.raises(RecipeError, match="reliability.on_nonfinite"):
            build_run(recipe, build_sft_datasets)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs mixtune[deepspeed]")
def test_r5_under_zero3_a_nan_on_one_rank_stops_every_rank_before_backward(tmp_path, monkeypatch):
    from tests.distributed.launch import launch

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MIXTUNE_TEST_NAN_ON_RANK0_AT", "3")
    out = tmp_path / "sft"
    args = [*SFT_LORA[1:], f"training.output_dir={out}", "training.ddp_backend=gloo"]
    done = launch(str(HELPER / "run_sft.py"), SFT_LORA[0], *args, timeout=300)
    assert done.returncode != 0
    # Both ranks stop at step 3, before backward (no hang waiting for rank 0 in a collective);
    # the message names rank 0's samples of that micro-batch.
    assert done.output.count("mixtune.sft: step 3: non-finite loss") == 2, done.output[-4000:]
    assert re.search(r"rank 0 micro-batch 1: samples data/tasks/sft_train.jsonl:\d+", done.output)
    assert is_complete(out / "checkpoint-4") is False and not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reliability.on_nonfinite=ignore", "reliability.on_nonfinite: expected one of 'stop', 'skip'"),
        ("reliability.max_nonfinite_skips=-1", "reliability.max_nonfinite_skips: must be >= 0"),
        ("reliability.max_skips=3", "did you mean reliability.max_nonfinite_skips"),
        (
            "reliability.allow_recipe_changes=data.train",
            "reliability.allow_recipe_changes: expected list[str]",
        ),
    ],
)
def test_reliability_section_is_checked_at_load(override, message):
    with in_repo(), pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("recipes/tiny/sft.yaml", "sft", [override])


# --- R6: a recipe changed between save and resume -------------------------------------------------------


@pytest.mark.slow
def test_r6_batch_size_change_is_refused_and_harmless_changes_warn(tmp_path, straight_lora, capsys, caplog):
    out = copy_run(straight_lora[0], tmp_path / "sft")
    code, _ = run_stage(
        "sft",
        SFT_LORA,
        out,
        "training.resume_from_checkpoint=latest",
        "training.per_device_train_batch_size=8",
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "training.per_device_train_batch_size: 4 -> 8" in err and "allow_recipe_changes" in err
    )

    shutil.rmtree(out / "checkpoint-8")
    harmless = ("training.logging_steps=2", "training.save_steps=2", "training.max_steps=10")
    with caplog.at_level(logging.WARNING):
        code, _ = run_stage("sft", SFT_LORA, out, "training.resume_from_checkpoint=latest", *harmless)
    assert code == 0
    for change in (
        "training.logging_steps: 1 -> 2",
        "training.save_steps: 4 -> 2",
        "training.max_steps: 8 -> 10",
    ):
        assert change in caplog.text


def test_r6_what_counts_as_a_meaningful_change(tmp_path):
    saved = {
        "model": {"name_or_path": "a"},
        "lora": {"r": 8, "dropout": 0.0},
        "training": {"hub_token": "***"},
    }
    current = {
        "model": {"name_or_path": "a"},
        "lora": {"r": 16, "dropout": 0.1},
        "training": {"hub_token": None},
    }
    assert recipe_changes(saved, current) == [("lora.dropout", 0.0, 0.1), ("lora.r", 8, 16)]
    (tmp_path / "recipe.yaml").write_text(json.dumps(saved))
    with pytest.raises(RecipeError, match=r"\(lora.r\)"):
        check_recipe(tmp_path, current, allowed=[], source="x.yaml")
    check_recipe(tmp_path, current, allowed=["lora.r"], source="x.yaml")  # declared on purpose: allowed


# --- R8: a saved adapter reloads in a fresh process ----------------------------------------------------


@pytest.mark.slow
def test_r8_adapter_is_non_empty_and_reloads_to_the_same_logits_in_a_fresh_process(tmp_path, straight_lora):
    out = straight_lora[0]
    adapter = weights(out / "adapter_model.safetensors")
    assert adapter and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    env = os.environ | ENV
    done = subprocess.run(
        [sys.executable, str(HELPER / "logits.py"), str(out), str(tmp_path / "fresh.safetensors")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    from tests.reliability.logits import IDS

    with in_repo():
        here = load_adapter(load_base_model(stage_model_section(out)), out).eval()
        base = load_base_model(stage_model_section(out)).eval()
    with torch.no_grad():
        expected, untuned = here(IDS).logits, base(IDS).logits
    fresh = weights(tmp_path / "fresh.safetensors")["logits"]
    # Same weights and kernels; only a different thread count could reorder a float sum.
    torch.testing.assert_close(fresh, expected, rtol=0, atol=1e-6)
    assert (fresh - untuned).abs().max() > 1e-4  # the adapter is really applied


# --- R10: secrets never written ----------------------------------------------------------------------------

WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
HF_TOKEN = "hf_EnvironmentTokenABCDEFGHIJKLMNOPQRSTUV"
HUB_TOKEN = "hf_RecipeTokenZYXWVUTSRQPONMLKJIHGFEDCBA"


@pytest.mark.slow
def test_r10_secrets_appear_in_no_file_a_run_writes(tmp_path, sft_dir, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = {"sft": tmp_path / "sft", "dpo": tmp_path / "dpo"}
    for stage, base in (("sft", SFT_LORA), ("dpo", [*DPO_LORA, f"model.name_or_path={sft_dir}"])):
        recipe = tmp_path / f"{stage}.yaml"
        text = (
            (REPO / base[0]).read_text().replace("training:\n", f"training:\n  hub_token: {HUB_TOKEN}\n", 1)
        )
        recipe.write_text(text.replace("data/tasks/", f"{REPO}/data/tasks/"))
        code, _ = run_stage(
            stage, [str(recipe), *base[1:]], runs[stage], "logging.wandb=true", "training.max_steps=4"
        )
        assert code == 0
    written = [p for out in runs.values() for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"training_args.bin", "trainer_state.json", "recipe.yaml", "README.md", "metrics.jsonl"} <= names
    assert any(p.suffix == ".wandb" for p in written)  # W&B's offline run files are among them
    captured = capfd.readouterr()
    for secret in (WANDB_KEY, HF_TOKEN, HUB_TOKEN):
        assert secret not in captured.out + captured.err
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, (secret, leaks)


def test_r10_hub_token_leaves_the_pickled_arguments(monkeypatch):
    from types import SimpleNamespace

    from mixtune.recipe.secrets import keep_hub_token_out_of_args

    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = SimpleNamespace(hub_token=HUB_TOKEN, push_to_hub=False)
    keep_hub_token_out_of_args(args)  # nothing will push: the token is simply dropped
    assert args.hub_token is None and "HF_TOKEN" not in os.environ
    args = SimpleNamespace(hub_token=HUB_TOKEN, push_to_hub=True)
    keep_hub_token_out_of_args(args)  # pushes authenticate from the environment instead
    assert args.hub_token is None and os.environ["HF_TOKEN"] == HUB_TOKEN


# --- R11: pickles and remote code never run -------------------------------------------------------------------


class Payload:
    """Unpickling this writes the marker file: the test fails if it ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)  # a valid torch archive, so only unpickling can stop it


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt"])
@pytest.mark.parametrize("scan", [True, False], ids=["mixtune-scan", "torch-weights-only"])
def test_r11_planted_pickles_in_a_checkpoint_never_run(
    tmp_path, straight_lora, monkeypatch, capsys, name, scan
):
    out = copy_run(straight_lora[0], tmp_path / "sft")
    checkpoint, marker = out / "checkpoint-4", tmp_path / "MARKER"
    plant(checkpoint / name, marker)
    (checkpoint / COMPLETE).unlink()
    write_complete(checkpoint, 4)  # the attacker also rewrote the manifest: integrity checks pass
    resume = f"training.resume_from_checkpoint={checkpoint}"
    if scan:
        code, _ = run_stage("sft", SFT_LORA, out, resume)
        assert code == 1 and f"{checkpoint / name}: refused" in capsys.readouterr().err
    else:  # without mixtune's scan, the Trainer's own torch.load(weights_only=True) still refuses
        monkeypatch.setattr(trainer_base, "refuse_unsafe_pickles", lambda checkpoint, deepspeed=False: None)
        with pytest.raises(Exception, match="Weights only load failed"):
            run_stage("sft", SFT_LORA, out, resume)
    assert not marker.exists()


def test_r11_deepspeed_files_may_name_only_deepspeeds_own_classes(tmp_path, caplog):
    checkpoint, marker = tmp_path / "checkpoint-4", tmp_path / "MARKER"
    (checkpoint / "global_step4").mkdir(parents=True)
    plant(checkpoint / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"optim_states.pt: refused: its pickle names .*pathlib"):
        refuse_unsafe_pickles(checkpoint, deepspeed=True)
    seen = ["deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler"]
    assert deepspeed_refusals(seen, checkpoint) == [] and not caplog.text
    assert deepspeed_refusals(["deepspeed.x.New", "posix.system"], checkpoint) == ["posix.system"]
    assert "deepspeed.x.New" in caplog.text  # allowed, with a warning
    # Opcodes beyond plain data (protocol 4 here) cannot be scanned: refused, not trusted.
    shutil.rmtree(checkpoint / "global_step4")
    torch.save({"state": Payload(marker)}, checkpoint / "rng_state.pth", pickle_protocol=4)
    with pytest.raises(CheckpointError, match=r"rng_state.pth: refused: its pickle names <unscannable"):
        refuse_unsafe_pickles(checkpoint)
    assert not marker.exists()


@pytest.mark.slow
def test_r11_pickled_model_and_adapter_weights_are_refused(tmp_path, sft_dir):
    marker = tmp_path / "MARKER"
    model_dir = tmp_path / "pickled_model"
    model_dir.mkdir()
    shutil.copy(sft_dir / "config.json", model_dir)
    plant(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="pickle"):
        run_stage("sft", ["recipes/tiny/sft.yaml", *SHAPE], tmp_path / "a", f"model.name_or_path={model_dir}")
    adapter_dir = tmp_path / "pickled_adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    plant(adapter_dir / "adapter_model.bin", marker)
    with pytest.raises(CheckpointError, match="safetensors only"):
        run_stage(
            "dpo", DPO_LORA, tmp_path / "b", f"model.name_or_path={sft_dir}", f"lora.init_from={adapter_dir}"
        )
    assert not marker.exists()


@pytest.mark.slow
def test_r11_remote_code_in_a_model_directory_never_runs(tmp_path, sft_dir):
    from mixtune.tokenizer import load_tokenizer

    marker, model_dir = tmp_path / "MARKER", shutil.copytree(sft_dir, tmp_path / "remote")
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    (model_dir / "modeling_evil.py").write_text(code + "class Evil: pass\n")
    (model_dir / "tokenization_evil.py").write_text(code + "class EvilTokenizer: pass\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (model_dir / "config.json").write_text(json.dumps(config))
    auto_map = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    MixtralForCausalLM.from_pretrained(model_dir)  # mixtune's own class, whatever config.json names
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer"):
        load_tokenizer(model_dir)
    assert not marker.exists()


# --- bad input: tokenizer and template ----------------------------------------------------------------------


def collated(trainer, n: int = 6) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.slow
def test_one_bos_and_a_labelled_eos_after_every_assistant_turn_through_the_sft_collator(tmp_path):
    trainer = make_trainer("sft", SFT_LORA, tmp_path / "out")
    tok, batch = trainer.processing_class, collated(trainer)
    assert batch["where"] and trainer.data_collator.collator.pad_token_id == 0 != tok.eos_token_id
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
        eos = ids == tok.eos_token_id
        assert eos.sum() >= 1 and ids[-1] == tok.eos_token_id
        assert torch.equal(labels[eos], ids[eos])  # every </s> is a target, none masked as padding


@pytest.mark.slow
def test_one_bos_and_eos_ending_each_reply_through_the_dpo_collator(tmp_path, sft_dir):
    trainer = make_trainer("dpo", [*DPO_LORA, f"model.name_or_path={sft_dir}"], tmp_path / "out")
    tok, batch = trainer.processing_class, collated(trainer)
    for ids, completion, mask in zip(
        batch["input_ids"], batch["completion_mask"], batch["attention_mask"], strict=True
    ):
        ids, completion = ids[mask.bool()], completion[mask.bool()]
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
        assert ids[-1] == tok.eos_token_id and completion[-1] == 1


@pytest.mark.slow
def test_padding_with_eos_is_refused(tmp_path, sft_dir):
    message = "training.pad_token: padding with the EOS token"
    with pytest.raises(RecipeError, match=message):  # SFT takes its pad token from the recipe
        make_trainer("sft", SFT_LORA, tmp_path / "a", "training.pad_token=</s>")
    with pytest.raises(RecipeError, match=message):  # DPO from the tokenizer
        base = [*DPO_LORA, f"model.name_or_path={sft_dir}"]
        make_trainer("dpo", base, tmp_path / "b", tokenizer_hook=lambda t: setattr(t, "pad_token", "</s>"))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_an_empty_data_file_is_named(tmp_path, stage):
    from mixtune.data import DataError, read_rows
    from mixtune.recipe import DataSource

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: no rows to read"):
        read_rows(DataSource(str(empty)), stage=stage)
