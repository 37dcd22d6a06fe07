"""DPO: the reference is the SFT model, the loss matches a direct computation, the entry point learns."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from trl import DPOConfig

from mixtune import dpo
from mixtune.data import build_preference_datasets
from mixtune.lora import apply_lora, make_lora_config
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.recipe.schema import DataSection, DataSource
from mixtune.tokenizer import load_tokenizer
from mixtune.train.dpo_trainer import MixtuneDPOTrainer
from mixtune.train.fused_head import install_fused_head
from mixtune.train.objective import RouterLossConfig
from tests.conftest import REPO

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def sft_dir(tmp_path):
    """A stand-in SFT output: a small random Mixtral saved as a model directory."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig.preset("tiny", **SMALL, initializer_range=0.1))
    model.save_pretrained(tmp_path / "sft")
    return tmp_path / "sft"


def pairs(tokenizer, limit=16):
    section = DataSection(
        train=[DataSource(path=str(REPO / "data/tasks/pref_train.jsonl"), limit=limit)], max_length=64
    )
    return build_preference_datasets(section, tokenizer)[0]


def trainer_for(model, tokenizer, tmp_path, loss_type, beta=0.1):
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        loss_type=[loss_type],
        beta=beta,
        max_length=64,
        per_device_train_batch_size=4,
        report_to="none",
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
    )
    return MixtuneDPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs(tokenizer),
        processing_class=tokenizer,
        router_cfg=RouterLossConfig(balance_coef=0.0, z_loss_coef=0.0),
        top_k=2,
    )


def sequence_logps(model, input_ids, attention_mask, completion_mask):
    """Direct: full logits, log-softmax, sum of the completion tokens' log-probs."""
    logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_lp = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (token_lp * completion_mask[:, 1:]).sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_direct_computation(tmp_path, sft_dir, tokenizer, loss_type):
    policy = apply_lora(
        MixtralForCausalLM.from_pretrained(sft_dir),
        make_lora_config(["q_proj", "w1", "w2"], 4, 8, init_lora_weights=False),
    )
    trainer = trainer_for(policy, tokenizer, tmp_path, loss_type)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy.eval()
    with torch.no_grad():
        # The reference is the model as the trainer received it (TRL keeps a frozen "ref" copy of
        # the adapter); then the policy moves away from it.
        ref = sequence_logps(policy, ids, mask, comp)
        for name, param in policy.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
        got = trainer._compute_loss(policy, batch, return_outputs=False)
        logps = sequence_logps(policy, ids, mask, comp)
    chosen, rejected = (logps - ref).chunk(2)
    if loss_type == "sigmoid":
        want = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
    else:  # IPO, per-token normalised as TRL documents
        n_chosen, n_rejected = comp.sum(1).chunk(2)
        want = ((chosen / n_chosen - rejected / n_rejected) - 1 / (2 * 0.1)).pow(2).mean()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_head_equals_full_forward_log_probs(sft_dir):
    model = MixtralForCausalLM.from_pretrained(sft_dir)
    ids = torch.randint(3, 32000, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    full = model(ids).logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    install_fused_head(model)
    out = model(ids, labels=labels, fused_lm_head=True)
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(out.log_probs[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.log_probs[~mask], torch.zeros_like(out.log_probs[~mask]))


@pytest.fixture
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("_in_repo")
@pytest.mark.parametrize("continue_adapter", [False, True], ids=["fresh-adapter", "continued-adapter"])
def test_reference_is_the_sft_model_and_dpo_learns(tmp_path, sft_dir, continue_adapter):
    overrides = []
    if continue_adapter:
        # An SFT adapter to continue: TRL keeps a frozen copy as the reference.
        adapter_dir = tmp_path / "sft_adapter"
        model = apply_lora(
            MixtralForCausalLM.from_pretrained(sft_dir),
            make_lora_config(["q_proj", "w2"], 4, 8, init_lora_weights=False),
        )
        model.save_pretrained(adapter_dir)
        overrides = [f"lora.init_from={adapter_dir}"]
    out = tmp_path / "dpo"
    args = [
        "recipes/tiny/dpo.yaml",
        f"model.name_or_path={sft_dir}",
        f"training.output_dir={out}",
        "training.max_steps=16",
        "training.logging_steps=1",
        "training.eval_steps=16",
        "training.save_steps=16",
        "training.learning_rate=5e-3",
        "training.loss_type=[sigmoid]",
        "training.loss_weights=[1.0]",
        "logging.wandb=false",
        *overrides,
    ]
    assert dpo.main(args) == 0
    rows = [r for r in metrics(out) if "rewards/margins" in r]
    # Step 1: policy == reference exactly, so every reward is exactly zero.
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/chosen"] == 0.0
    # A random stand-in model learns little in 16 steps; held-out pairs must still move the right way.
    final_eval = [r for r in metrics(out) if "eval_rewards/margins" in r][-1]
    assert final_eval["eval_rewards/margins"] > 0 and final_eval["eval_rewards/accuracies"] > 0.5, final_eval
    assert any("router/layer1/expert0_share" in r for r in metrics(out))
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("_in_repo")
def test_precomputed_reference_gives_the_same_first_step(tmp_path, sft_dir):
    first = {}
    for precompute in (False, True):
        out = tmp_path / f"dpo-{precompute}"
        args = [
            "recipes/tiny/dpo.yaml",
            f"model.name_or_path={sft_dir}",
            f"training.output_dir={out}",
            "training.max_steps=2",
            "training.logging_steps=1",
            "training.eval_strategy=no",
            "training.save_strategy=no",
            f"training.precompute_ref_log_probs={str(precompute).lower()}",
            "data.train.0.limit=64",
            "logging.wandb=false",
        ]
        assert dpo.main(args) == 0
        first[precompute] = [r for r in metrics(out) if "loss" in r][0]
    for key in ("loss", "rewards/margins", "router/z_loss", "router/balance_loss"):
        assert first[True][key] == pytest.approx(first[False][key], abs=1e-5), key
