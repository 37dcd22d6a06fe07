"""load_for_inference on every kind of mixtune directory, and the terminal chat (prompt building, history, CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mixtune import chat as chat_module
from mixtune.chat import Chat, build_prompt_ids, fit_history, run_loop
from mixtune.chat_format import encode_prompt
from mixtune.generate import generate
from mixtune.inference import load_for_inference
from mixtune.lora import apply_lora, make_lora_config
from mixtune.model import MixtralConfig, MixtralForCausalLM
from mixtune.recipe import ModelSection
from mixtune.tokenizer import load_tokenizer, save_tokenizer
from mixtune.train.model_loading import load_base_model
from tests.conftest import REPO

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
IDS = torch.tensor([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]])


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def save_tiny_model(directory):
    """A random tiny Mixtral with the real vocabulary, saved as a full model directory with its tokenizer."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig.preset("tiny", **SMALL)).eval()
    model.save_pretrained(directory)
    save_tokenizer(load_tokenizer(), directory)
    return model


def lora_adapter(model):
    return apply_lora(
        model, make_lora_config(["q_proj", "v_proj", "w1", "w2"], r=4, alpha=8, init_lora_weights=False)
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Ops on these widths are too small to split; two threads that must meet on a busy 2-core machine
    made generation 50x slower, measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(directory), directory


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_full_directory_gives_the_saved_models_logits(tiny):
    model, directory = tiny
    loaded, tokenizer = load_for_inference(directory)
    assert not loaded.training and tokenizer.eos_token_id == 2
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_adapter_on_a_local_base_gives_the_adapted_logits(tiny, tmp_path):
    _, base_dir = tiny
    peft_model = lora_adapter(MixtralForCausalLM.from_pretrained(base_dir))
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, tokenizer = load_for_inference(tmp_path / "adapter")  # no tokenizer there: the base's
    assert hasattr(loaded, "get_base_model") and not loaded.training
    expected = peft_model(IDS).logits
    torch.testing.assert_close(loaded(IDS).logits, expected, atol=0, rtol=0)
    with peft_model.disable_adapter():
        assert (peft_model(IDS).logits - expected).abs().max() > 1e-4  # the adapter is not a no-op


def test_adapter_on_a_preset_base_is_rebuilt_from_its_recipe(tmp_path):
    section = ModelSection("preset:tiny", config_overrides=SMALL, init_seed=3)
    peft_model = lora_adapter(load_base_model(section))
    peft_model.save_pretrained(tmp_path)  # PEFT records no base for a preset, as in a real run
    with pytest.raises(FileNotFoundError, match="recipe.yaml"):
        load_for_inference(tmp_path)
    # Only the model section is read: the data files of the run need not exist here.
    (tmp_path / "recipe.yaml").write_text(
        "stage: sft\nmodel:\n  name_or_path: preset:tiny\n  init_seed: 3\n"
        "  config_overrides: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2}\n"
        "data:\n  train:\n    - path: /nowhere/train.jsonl\n"
    )
    expected = peft_model(IDS).logits
    loaded, _ = load_for_inference(tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, expected, atol=0, rtol=0)
    # A Trainer checkpoint inside the output directory finds the recipe one level up.
    peft_model.save_pretrained(tmp_path / "checkpoint-5")
    loaded, _ = load_for_inference(tmp_path / "checkpoint-5")
    torch.testing.assert_close(loaded(IDS).logits, expected, atol=0, rtol=0)


def test_unloadable_directories_are_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: not a directory"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"{tmp_path}: neither config.json"):
        load_for_inference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MixtralConfig.preset("tiny").to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        load_for_inference(tmp_path)


def test_prompt_ids_are_the_chat_format_and_survive_an_empty_reply(tokenizer):
    history = [user("Hi"), assistant("Hello!"), user("Name a colour.")]
    assert build_prompt_ids(tokenizer, history, "Be brief.") == encode_prompt(
        tokenizer, [{"role": "system", "content": "Be brief."}, *history]
    )
    # An immediate </s> is a legal reply; the next prompt carries it as that </s> alone.
    blank = [user("Hi"), assistant(" "), user("Again?")]
    head, tail = encode_prompt(tokenizer, [user("Hi")]), encode_prompt(tokenizer, [user("Again?")])
    assert build_prompt_ids(tokenizer, blank) == head + [2] + tail[1:]


def test_oldest_exchanges_are_dropped_to_fit(tokenizer):
    history = [user("one " * 20), assistant("two " * 20), user("three"), assistant("four"), user("five")]
    full = build_prompt_ids(tokenizer, history)
    assert fit_history(tokenizer, history, len(full)) == (full, 0)
    ids, dropped = fit_history(tokenizer, history, len(full) - 1, system="sys")
    assert dropped == 1 and ids == build_prompt_ids(tokenizer, history[2:], system="sys")
    with pytest.raises(ValueError, match="this message takes"):
        fit_history(tokenizer, history, 3)


def test_chat_keeps_its_answers_in_the_history_and_reset_forgets(tiny, monkeypatch, capsys):
    model, directory = tiny
    tokenizer = load_tokenizer(directory)
    prompts = []

    def recording_generate(model, batch, **kwargs):
        prompts.append(batch[0])
        return generate(model, batch, **kwargs)

    monkeypatch.setattr(chat_module, "generate", recording_generate)
    session = Chat(model, tokenizer, max_new_tokens=6)
    run_loop(session, ["Hello there", "", "And then?", "/reset", "Fresh start", "/quit", "never read"])
    assert len(prompts) == 3
    # The second prompt is the first conversation plus the model's own first answer.
    first = prompts[0]
    reply = tokenizer.decode(generate(model, [first], 6, eos_token_id=2)[0], skip_special_tokens=True)
    history = [user("Hello there"), assistant(reply.strip()), user("And then?")]
    assert prompts[1] == build_prompt_ids(tokenizer, history)
    assert prompts[1][: len(first)] == first
    # /reset: the third prompt starts a conversation of one message; /quit ends the loop.
    assert prompts[2] == encode_prompt(tokenizer, [user("Fresh start")])
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Fresh start"]
    assert "[new conversation]" in capsys.readouterr().err


def test_prompt_flag_answers_once(tiny, capsys):
    model, directory = tiny
    assert chat_module.main([str(directory), "--prompt", "Say hi.", "--max-new-tokens", "5"]) == 0
    tokenizer = load_tokenizer(directory)
    ids = encode_prompt(tokenizer, [user("Say hi.")])
    expected = tokenizer.decode(
        generate(model, [ids], 5, eos_token_id=2)[0], skip_special_tokens=True
    ).strip()
    assert capsys.readouterr().out == expected + "\n"


def test_piped_stdin_runs_a_conversation(tiny):
    _, directory = tiny
    result = subprocess.run(
        [sys.executable, "-m", "mixtune.chat", str(directory), "--max-new-tokens", "3"],
        input="Hi\nTell me more\n/reset\nBye\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "mixtune chat:" in result.stderr and "/quit" in result.stderr
    assert "[new conversation]" in result.stderr
    assert result.stdout.count("\n\n") >= 3  # one block per answer
