"""B7: a DPO step / an SFT step on the same pairs (tiny model, LoRA on attention + experts).

    python -m bench.b7_dpo [--repeats 5]

A DPO step runs the policy forward and backward on both the chosen and the rejected sequence, plus
a no-grad reference forward on both: about 2 + 2/3 SFT steps when one SFT step is a forward and
backward (about 3 forwards) on the chosen sequence alone; with precomputed reference log-probs
the reference forward leaves the step, about 2.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

import torch
from trl import DPOConfig, SFTConfig

from bench.common import interleaved, median_ratio, table, write_result
from mixtune.data import build_preference_datasets
from mixtune.lora import apply_lora, make_lora_config
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.recipe.schema import DataSection, DataSource
from mixtune.tasks import TASK_FILES
from mixtune.tokenizer import load_tokenizer
from mixtune.train.dpo_trainer import MixtuneDPOTrainer
from mixtune.train.objective import RouterLossConfig
from mixtune.train.sft_trainer import MixtuneSFTTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


def trainers(tmp: str, pairs, tokenizer, precompute: bool):
    common = dict(
        output_dir=tmp,
        report_to="none",
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=16,
        activation_checkpointing=False,
        max_length=64,
    )
    router = RouterLossConfig(balance_coef=0.02, z_loss_coef=0.001)

    def model():
        torch.manual_seed(0)
        return apply_lora(MixtralForCausalLM(MixtralConfig.preset("tiny")), make_lora_config(TARGETS, 16, 32))

    sft_rows = pairs.map(
        lambda r: {
            "input_ids": r["prompt_ids"] + r["chosen_ids"],
            "labels": [-100] * len(r["prompt_ids"]) + r["chosen_ids"],
        },
        remove_columns=pairs.column_names,
    )
    sft = MixtuneSFTTrainer(
        model=model(),
        args=SFTConfig(**common),
        train_dataset=sft_rows,
        processing_class=tokenizer,
        router_cfg=router,
        top_k=2,
    )
    dpo = MixtuneDPOTrainer(
        model=model(),
        args=DPOConfig(**common, precompute_ref_log_probs=precompute),
        train_dataset=pairs,
        processing_class=tokenizer,
        router_cfg=router,
        top_k=2,
    )
    return sft, dpo


def run(repeats: int) -> dict:
    tokenizer = load_tokenizer()
    section = DataSection(train=[DataSource(path=str(TASK_FILES["pref_train"]), limit=64)], max_length=64)
    pairs = build_preference_datasets(section, tokenizer)[0].remove_columns("where")
    results = {}
    for precompute in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            sft, dpo = trainers(tmp, pairs, tokenizer, precompute)
            dpo_train = dpo.get_train_dataloader()  # precomputes the reference log-probs when asked
            sft_batch = sft._prepare_inputs(next(iter(sft.get_train_dataloader())))
            # Set by the Trainer's loop, which this benchmark bypasses to time one step alone.
            sft.current_gradient_accumulation_steps = dpo.current_gradient_accumulation_steps = 1
            dpo_batch = dpo._prepare_inputs(next(iter(dpo_train)))
            times = interleaved(
                {
                    "sft": partial(sft.training_step, sft.model, sft_batch, None),
                    "dpo": partial(dpo.training_step, dpo.model, dpo_batch, None),
                },
                repeats=repeats,
                warmup=1,
            )
        results["precomputed" if precompute else "reference_forward"] = median_ratio(times, "dpo", "sft")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(args.repeats)
    rows = [
        ("B7 DPO step / SFT step (reference forward)", f"{r['reference_forward']:.2f}", "about 2.67"),
        ("B7 with precomputed reference log-probs", f"{r['precomputed']:.2f}", "about 2"),
    ]
    print(table("DPO vs SFT step on the same 16 pairs, tiny model, LoRA", rows))
    write_result("B7", {"B7": r["reference_forward"], "B7_precomputed": r["precomputed"]})


if __name__ == "__main__":
    main()
