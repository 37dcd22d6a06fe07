"""DeepSpeed ZeRO-3: the configs, the leaf registration, and real launches on 2 CPU processes.

Launched tests run `accelerate launch --config_file configs/cpu_zero3.yaml --num_processes 2 ...`
as a user types it (fp32, gloo), each with a hard timeout (tests/distributed/launch.py). They check:
- SFT and DPO run to completion, with the MoE blocks registered as ZeRO-3 leaves;
- 2 processes x 4 sequences give the losses of 1 process x 8 (same seed, same data order), and
  save the same full model and the same adapter, gathered from the shards;
- a run saved and resumed under ZeRO-3 continues as the uninterrupted run;
- ranks whose tokens go to different experts finish (R7), also with per-expert modules;
- a rank that raises ends the whole launch, non-zero, naming that rank;
- a NaN gradient behind a finite loss stops the run (DeepSpeed steps inside its engine);
- the pipeline merges and exports from ZeRO-3 stages.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixtune import dpo, sft
from mixtune.lora import apply_lora, load_adapter, make_lora_config
from mixtune.model import MixtralForCausalLM
from mixtune.recipe.loader import read_recipe_file
from tests.conftest import REPO, tiny_config
from tests.distributed.launch import CPU_ZERO3, launch, run, succeeded

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs mixtune[deepspeed]"
)

SMALL = "model.config_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}"
QUIET = [
    "training.logging_steps=1",
    "training.eval_strategy=no",
    "training.save_strategy=no",
    "logging.wandb=false",
]
# Activation checkpointing and packing, as the 8x7B ZeRO-3 recipe trains (TRL #2514 was about the first).
SFT_RUN = [SMALL, *QUIET, "training.max_steps=6", "training.warmup_steps=0"]
SFT_RUN += ["training.activation_checkpointing=true", "data.packing=true"]
# DPO's split-invariant terms only: TRL's "sft" term and the DPO balance loss are averaged per
# micro-batch, so they change when a batch is split over ranks (with or without ZeRO); sigmoid does not.
DPO_RUN = [*QUIET, "training.max_steps=3", "training.warmup_steps=0", "training.loss_type=[sigmoid]"]
DPO_RUN += ["training.loss_weights=[1.0]", "router.balance_coef=0", "router.z_loss_coef=0"]
GLOO = "training.ddp_backend=gloo"  # on CPU, inside a launch (docs/distributed.md)


def launched(test):
    """A test that launches processes (20-30 s each on 2 cores; part of `make test`)."""
    return pytest.mark.distributed(pytest.mark.slow(test))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metrics(out) if "loss" in row]


def assert_same_losses(two: list[float], one: list[float]) -> None:
    """Step 1 is the same sum split differently; later steps carry 1e-7-size summation
    differences through Adam, measured here at about 1e-7 relative: 1e-4 is a wide margin."""
    assert len(two) == len(one) > 1
    assert two[0] == pytest.approx(one[0], rel=1e-5), (two, one)
    assert two == pytest.approx(one, rel=1e-4), (two, one)


def assert_same_weights(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> None:
    """Equal up to what Adam does with float rounding. Adam divides by the root of the second moment,
    so a rounding difference in a near-zero gradient can become an lr-sized step on the few elements
    that have one (measured: up to 6e-4 on 1.4% of a rarely routed expert's elements). The typical
    element agrees to rounding, which a wrong gather (weights differ by their own scale, 1e-2) or a
    stale one (differs by the training update, lr 2e-3 x steps) cannot do."""
    assert two.keys() == one.keys()
    for key in two:
        assert two[key].shape == one[key].shape, key
        diff = (two[key] - one[key]).abs().flatten().double()
        assert diff.median() < 1e-5 and (diff > 1e-4).double().mean() < 0.1, (key, diff.median(), diff.max())


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


# --- configs and the leaf registration, in this process --------------------------------------------

ACCELERATE_CONFIGS = {
    "single_gpu.yaml": ("NO", 1),
    "multi_gpu.yaml": ("MULTI_GPU", 8),
    "zero3.yaml": ("DEEPSPEED", 8),
    "zero3_offload.yaml": ("DEEPSPEED", 8),
    "multinode_zero3.yaml": ("DEEPSPEED", 16),
    "cpu_zero3.yaml": ("DEEPSPEED", 2),
}


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_configs_load_as_accelerate_reads_them(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "configs" / name
    config = load_config_from_file(str(path))
    assert (config.distributed_type.value, config.num_processes) == ACCELERATE_CONFIGS[name]
    if config.distributed_type.value == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["zero3_init_flag"] is True and (REPO / ds["deepspeed_config_file"]).is_file()
        # Accelerate refuses a mixed_precision key next to a DeepSpeed JSON (bf16 comes from the JSON).
        assert "mixed_precision" not in read_recipe_file(path)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero3_cpu.json"])
def test_deepspeed_json_is_stage3_saving_whole_weights(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = json.loads((REPO / "configs" / "deepspeed" / name).read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    # The HF integration fills "auto" from the trainer config and the model; stand in for it.
    assert DeepSpeedZeroConfig(**{k: 10**6 if v == "auto" else v for k, v in zero.items()}).stage == 3


def test_moe_blocks_become_zero3_leaves():
    from deepspeed.utils import unset_z3_leaf_modules

    from mixtune import distributed
    from mixtune.model.moe import MoEBlock

    model = apply_lora(
        MixtralForCausalLM(tiny_config()), make_lora_config(["q_proj", "w1", "w2", "w3"], 4, 8)
    )
    assert not distributed.zero3_enabled()  # outside a DeepSpeed launch
    assert distributed.register_moe_leaves(model) == 2 == distributed.leaf_count(model)
    assert distributed.zero3_summary(model).startswith(
        "MoE block registered as a ZeRO-3 leaf in all 2 layers"
    )
    unset_z3_leaf_modules(model, [MoEBlock])
    assert distributed.zero3_summary(model).startswith("WARNING: only 0 of 2 MoE blocks")


# --- launched runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zero3")


@pytest.fixture(scope="module")
def zero3_sft(runs):
    """Full fine-tuning of a small tiny Mixtral, 2 processes x 4 sequences, ZeRO-3."""
    out = runs / "sft_zero3"
    args = ["recipes/tiny/sft.yaml", f"training.output_dir={out}", *SFT_RUN]
    result = succeeded(launch("-m", "mixtune.sft", *args, "training.per_device_train_batch_size=4", GLOO))
    return out, result


@pytest.fixture(scope="module")
def one_process_sft(runs) -> Path:
    """The same training in this process, 1 x 8 sequences: the same global batch."""
    out = runs / "sft_one"
    assert (
        sft.main(
            [
                "recipes/tiny/sft.yaml",
                f"training.output_dir={out}",
                *SFT_RUN,
                "training.per_device_train_batch_size=8",
            ]
        )
        == 0
    )
    return out


@launched
def test_sft_under_zero3_completes_with_moe_leaves(zero3_sft):
    out, result = zero3_sft
    assert "zero3      MoE block registered as a ZeRO-3 leaf in all 2 layers" in result.output
    assert "2 process(es)" in result.output
    assert (out / "model.safetensors").exists() and (out / "recipe.yaml").exists()


@launched
def test_two_processes_match_one_process_with_the_same_global_batch(zero3_sft, one_process_sft):
    # Accelerate hands rank r the batches r, r+2, ... of one seeded order, so 2 x 4 sees the very 8
    # sequences 1 x 8 sees at each step; mixtune's SFT losses are normalised over the whole step.
    assert_same_losses(losses(zero3_sft[0]), losses(one_process_sft))


@launched
def test_saved_model_is_gathered_whole(zero3_sft, one_process_sft):
    two, one = (load_file(d / "model.safetensors") for d in (zero3_sft[0], one_process_sft))
    assert_same_weights(two, one)
    model = MixtralForCausalLM.from_pretrained(zero3_sft[0])
    assert torch.isfinite(model(torch.tensor([[1, 733, 16289, 28793]])).logits).all()


@pytest.fixture(scope="module")
def sft_adapter(zero3_sft, runs) -> Path:
    """An SFT adapter on the ZeRO-3 SFT model, for DPO to continue (the 8x7B recipes' path)."""
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "w1", "w2", "w3"]
    model = MixtralForCausalLM.from_pretrained(zero3_sft[0])
    apply_lora(model, make_lora_config(targets, 4, 8, init_lora_weights=False)).save_pretrained(
        runs / "sft_adapter"
    )
    return runs / "sft_adapter"


@launched
def test_dpo_under_zero3_continues_the_adapter_and_saves_it_gathered(zero3_sft, sft_adapter, runs):
    two, one = runs / "dpo_zero3", runs / "dpo_one"
    args = [
        "recipes/tiny/dpo.yaml",
        f"model.name_or_path={zero3_sft[0]}",
        f"lora.init_from={sft_adapter}",
        *DPO_RUN,
    ]
    batch = "training.per_device_train_batch_size"
    result = succeeded(launch("-m", "mixtune.dpo", *args, f"training.output_dir={two}", f"{batch}=4", GLOO))
    assert "registered as a ZeRO-3 leaf" in result.output
    assert dpo.main([*args, f"training.output_dir={one}", f"{batch}=8"]) == 0

    assert next(row["rewards/margins"] for row in metrics(two) if "rewards/margins" in row) == 0.0  # R9
    assert_same_losses(losses(two), losses(one))
    adapter_two, adapter_one = (load_file(d / "adapter_model.safetensors") for d in (two, one))
    assert any(".experts.w2_proj.lora_B" in key for key in adapter_two)
    assert_same_weights(adapter_two, adapter_one)
    # The saved adapter reloads onto the SFT model and has moved away from the SFT adapter.
    ids = torch.tensor([[1, 733, 16289, 28793, 28705]])
    logits = [
        load_adapter(MixtralForCausalLM.from_pretrained(zero3_sft[0]), adapter)(ids).logits
        for adapter in (two, sft_adapter)
    ]
    assert torch.isfinite(logits[0]).all() and (logits[0] - logits[1]).abs().max() > 1e-6


@launched
def test_zero3_resume_continues_as_the_uninterrupted_run(runs):
    """A ZeRO-3 run saved at step 3 and resumed (partitioned weights, optimizer state, RNG per rank)
    gives the losses and final weights of the same run left alone to step 6."""
    run = [SMALL, *QUIET, "training.max_steps=6", "training.warmup_steps=0", GLOO]
    run += ["training.save_strategy=steps", "training.save_steps=3", "training.per_device_train_batch_size=4"]
    straight = runs / "resume_straight"
    succeeded(launch("-m", "mixtune.sft", "recipes/tiny/sft.yaml", f"training.output_dir={straight}", *run))
    resumed = runs / "resume_resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")  # as if stopped after step 3
    args = [
        "recipes/tiny/sft.yaml",
        f"training.output_dir={resumed}",
        *run,
        "training.resume_from_checkpoint=latest",
    ]
    succeeded(launch("-m", "mixtune.sft", *args))

    def by_step(out: Path) -> dict[int, float]:
        return {row["step"]: row["loss"] for row in metrics(out) if "loss" in row}

    after = by_step(resumed)
    assert sorted(after) == [4, 5, 6], after
    assert after == pytest.approx({step: by_step(straight)[step] for step in after}, rel=1e-5)
    two, one = (load_file(d / "model.safetensors") for d in (resumed, straight))
    assert_same_weights(two, one)


@launched
@pytest.mark.parametrize("layout", ["stacked-lora", "per-expert"])
def test_ranks_routing_to_different_experts_finish(runs, layout):
    """R7. Rank 0's tokens only reach experts 0-3 and rank 1's only experts 4-7, in every layer.

    `per-expert` calls each expert's own module only when it has tokens (transformers' Mixtral
    layout), so the ranks run different modules: without mixtune's leaf registration this run stops
    after step 1 ("Detected a disagreement on list contents between rank0 and rank1", DeepSpeed
    0.19; older versions hang). See docs/distributed.md.
    """
    out = runs / f"routing_{layout}"
    flags = ["--per-expert"] if layout == "per-expert" else []
    succeeded(launch("-m", "tests.distributed.divergent_routing", str(out), *flags, timeout=180))
    report = json.loads((out / "routing.json").read_text())
    assert report["steps"] == 4 and report["leaf"]
    for layer0, layer1 in zip(*report["experts_used"], strict=True):
        assert layer0 and set(layer0) <= {0, 1, 2, 3}, report
        assert layer1 and set(layer1) <= {4, 5, 6, 7}, report


@launched
def test_a_failing_rank_ends_the_launch_and_is_named(runs):
    args = ["recipes/tiny/sft.yaml", f"training.output_dir={runs / 'failing'}", SMALL, *QUIET]
    args += ["training.max_steps=4", "training.per_device_train_batch_size=4", GLOO]
    result = launch("-m", "tests.distributed.fail_on_rank", "1", *args, timeout=180)
    assert result.returncode != 0, result.output[-4000:]
    assert "RuntimeError: injected failure on rank 1 after step 1" in result.output
    root_cause = result.output.split("Root Cause (first observed failure):")[-1]
    assert "rank      : 1 (local_rank: 1)" in root_cause, result.output[-4000:]


@launched
def test_a_nan_gradient_behind_a_finite_loss_stops_a_zero3_run(runs):
    """DeepSpeed applies updates inside its engine, past mixtune's pre-step check; the guard reads
    the engine's gradient norm after the step instead, and stops the run naming the step."""
    out = runs / "nan_gradient"
    args = ["recipes/tiny/sft.yaml", f"training.output_dir={out}", SMALL, *QUIET, GLOO]
    args += ["training.max_steps=4", "training.per_device_train_batch_size=4"]
    result = launch("-m", "tests.distributed.nan_gradient", *args, timeout=180)
    assert result.returncode != 0, result.output[-4000:]
    assert "mixtune.sft: step 2: non-finite gradient (NaN or Inf)" in result.output, result.output[-4000:]
    assert "data/tasks/sft_train.jsonl:" in result.output  # the step's samples are named
    assert not (out / "model.safetensors").exists()


@launched
def test_pipeline_merges_and_exports_from_zero3_stages(runs):
    out = runs / "pipeline"
    # use_cpu, not ddp_backend: the pipeline also loads the stage recipes itself, outside a launch,
    # where a gloo process group cannot start.
    stage = [*QUIET, "training.max_steps=3", "training.use_cpu=true"]
    sft_overrides = [f"training.output_dir={out / 'sft'}", SMALL, *stage]
    dpo_overrides = [f"training.output_dir={out / 'dpo'}", *stage]
    command = [sys.executable, "-m", "mixtune.pipeline", "recipes/tiny/pipeline.yaml"]
    command += [f"accelerate_config={CPU_ZERO3}", "num_processes=2", f"export_dir={out / 'instruct'}"]
    command += [f"sft_overrides={json.dumps(sft_overrides)}", f"dpo_overrides={json.dumps(dpo_overrides)}"]
    result = succeeded(run(command, timeout=480))
    assert result.output.count("zero3      MoE block registered as a ZeRO-3 leaf") == 2  # SFT and DPO
    checks = json.loads((out / "instruct" / "export_checks.json").read_text())
    assert {"merged == adapter (mixtune)", "exported, loaded by transformers"} <= checks.keys(), checks
