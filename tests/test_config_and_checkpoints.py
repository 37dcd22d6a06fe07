"""Bad configs and bad checkpoints fail with errors that say what is wrong."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.model.weights import CheckpointError
from tests.conftest import tiny_config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "does not divide hidden_size"),
        (dict(num_key_value_heads=3), "does not divide num_attention_heads"),
        (dict(num_experts_per_tok=5), "cannot pick more experts than exist"),
        (dict(num_local_experts=0), "num_local_experts must be a positive integer"),
        (dict(sliding_window=0), "sliding_window"),
    ],
)
def test_impossible_configs_say_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_whole_numbers_are_taken_for_float_fields(tmp_path):
    # `router.balance_coef=0` reached the config as the int 0 (TRL copies it in) and transformers'
    # strict config refused it from deep inside huggingface_hub.
    config = tiny_config(router_aux_loss_coef=0, rms_norm_eps=1)
    config.router_aux_loss_coef = 0  # as SFTTrainer assigns args.router_aux_loss_coef
    assert (config.router_aux_loss_coef, config.rms_norm_eps) == (0.0, 1.0)
    assert type(config.router_aux_loss_coef) is float and type(config.rms_norm_eps) is float
    raw = {**config.to_dict(), "router_aux_loss_coef": 0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert MixtralConfig.from_pretrained(tmp_path).router_aux_loss_coef == 0.0


def test_presets_and_config_json_round_trip(tmp_path):
    big = MixtralConfig.preset("mixtral-8x7b")
    assert (big.hidden_size, big.intermediate_size, big.num_local_experts, big.num_experts_per_tok) == (
        4096,
        14336,
        8,
        2,
    )
    assert MixtralConfig.preset("mixtral-8x22b").num_hidden_layers == 56
    with pytest.raises(ValueError, match="known presets"):
        MixtralConfig.preset("mixtral-9x9b")
    # A hub-style config.json (rope_theta at top level, as Mixtral v0.1 ships it) reads.
    raw = {**MixtralConfig.preset("tiny").to_dict()}
    raw.pop("rope_parameters")
    raw["rope_theta"] = 1e6
    raw["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = MixtralConfig.from_pretrained(tmp_path)
    assert cfg.rope_base == 1e6 and cfg.sliding_window == 4096


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _edit_weights(saved, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        MixtralForCausalLM.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_weights(saved, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.0\.extra\.weight"):
        MixtralForCausalLM.from_pretrained(saved)


def test_misshaped_tensor_is_named(saved):
    _edit_weights(saved, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.norm\.weight \[3\] \(expected \[64\]\)"):
        MixtralForCausalLM.from_pretrained(saved)


def test_truncated_file_is_named(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MixtralForCausalLM.from_pretrained(saved)


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, saved):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="pickle"):
        MixtralForCausalLM.from_pretrained(saved)
    assert not marker.exists()


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MixtralForCausalLM.from_pretrained(tmp_path)
