"""Strict loading: wrong tensors or another package version give a ValueError that names them, never random weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from fastgpt_hf import FastGPTForCausalLM
from fastgpt_hf.configuration_fastgpt import FASTGPT_HF_VERSION

from .conftest import tiny_model

MEMORY_K = "model.layers.1.self_attn.memory_k"


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_weights(folder, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_tied_checkpoint_loads_cleanly_with_identical_logits(checkpoint):
    model, report = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert "lm_head.weight" not in load_file(checkpoint / "model.safetensors")
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    input_ids = torch.arange(30)[None] % 128
    expected = FastGPTForCausalLM.from_pretrained(checkpoint)(input_ids).logits
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=0)


def test_untied_lm_head_round_trips_and_base_model_loads_from_causal_checkpoint(tmp_path):
    model = tiny_model("dynamic", dtype=torch.float32, tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)  # the head is the one tensor a base model leaves out
    torch.testing.assert_close(base.layers[0].self_attn.memory_k, model.model.layers[0].self_attn.memory_k)


@pytest.mark.parametrize(
    "name", [MEMORY_K, "model.layers.3.self_attn.mix_gate.bias", "model.layers.0.mlp.up_proj.weight"]
)
def test_missing_tensor_is_named(checkpoint, name):
    edit_weights(checkpoint, lambda weights: weights.pop(name))
    with pytest.raises(ValueError, match=rf"missing from the checkpoint: {name}\n") as error:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    assert "FastGPTForCausalLM" in str(error.value)


def test_unexpected_tensor_is_named(checkpoint):
    extra = "model.layers.0.self_attn.memory_k"  # layer 0 is a sliding layer: it has no memory slots
    edit_weights(checkpoint, lambda weights: weights.update({extra: torch.zeros(2, 2, 16)}))
    with pytest.raises(ValueError, match=rf"unexpected in the checkpoint: {extra}"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_mis_shaped_tensors_are_named_with_both_shapes(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_memory_tokens": 3}))
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    message = str(error.value)
    assert f"mis-shaped: {MEMORY_K} is (2, 2, 16) in the checkpoint, (3, 2, 16) in the model" in message
    assert "model.layers.3.self_attn.memory_v" in message
    assert "ignore_mismatched_sizes=True" in message
    model = AutoModelForCausalLM.from_pretrained(checkpoint, ignore_mismatched_sizes=True)  # a deliberate reset
    assert model.model.layers[1].self_attn.memory_k.shape == (3, 2, 16)


def test_config_records_the_package_version(checkpoint):
    assert json.loads((checkpoint / "config.json").read_text())["fastgpt_hf_version"] == FASTGPT_HF_VERSION


@pytest.mark.parametrize("version", ["0.0.9", "1.1.0", "0.2.0"])
def test_checkpoint_of_another_major_minor_version_is_refused(checkpoint, version):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "fastgpt_hf_version": version}))
    expected = rf"written by fastgpt_hf {version}, but this is fastgpt_hf {FASTGPT_HF_VERSION}"
    with pytest.raises(ValueError, match=expected):
        AutoConfig.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_checkpoint_of_another_patch_version_loads(checkpoint):
    major, minor, _ = FASTGPT_HF_VERSION.split(".")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "fastgpt_hf_version": f"{major}.{minor}.99"}))
    assert AutoConfig.from_pretrained(checkpoint).fastgpt_hf_version == FASTGPT_HF_VERSION


def test_truncated_weights_file_is_a_clear_error(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not be read .* truncated or corrupt; save or download it again"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_captioning_checkpoint_missing_a_language_model_tensor_is_named(tmp_path):
    """Every registered model class loads strictly, the captioning model included."""
    from .test_multimodal import build_model, tiny_processor

    build_model(tiny_processor()).save_pretrained(tmp_path)
    name = "model.language_model.layers.1.self_attn.memory_k"
    edit_weights(tmp_path, lambda weights: weights.pop(name))
    with pytest.raises(ValueError, match=rf"missing from the checkpoint: {name}\n") as error:
        AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert "FastGPTForConditionalGeneration" in str(error.value)


def test_captioning_checkpoint_of_another_major_minor_version_is_refused(tmp_path):
    """The captioner's config records the version in its text_config, which is checked as the text model's."""
    from .test_multimodal import build_model, tiny_processor

    build_model(tiny_processor()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["fastgpt_hf_version"] == FASTGPT_HF_VERSION
    config["text_config"]["fastgpt_hf_version"] = "0.2.0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"written by fastgpt_hf 0\.2\.0, .*trust_remote_code=True"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)
