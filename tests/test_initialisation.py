"""The initialisation the README documents (`_init_weights`): memory slots at the scale of projected keys and values,
compressors at the identity with zero bias, the gate at 0.5 (bias 0), in every model class built from a config,
and in what `from_pretrained` re-initialises on purpose (`ignore_mismatched_sizes=True`); a checkpoint missing one
of these parameters is refused, never filled in."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, FastGPTForConditionalGeneration, FastGPTModel, FastGPTVLConfig

from .test_multimodal import VISION_CONFIG

# Enough memory slots that their spread is measured to a few percent; Transformers' default initializer_range.
TEXT_FIELDS = {"num_memory_tokens": 64, "initializer_range": 0.02}
GLOBAL_BRANCH_PARAMETERS = ["memory_k", "memory_v"] + [
    f"{module}.{tensor}" for module in ("compress_k", "compress_v", "mix_gate") for tensor in ("weight", "bias")
]


def text_config() -> FastGPTConfig:
    return FastGPTConfig.from_preset("tiny", **TEXT_FIELDS)


def causal_lm() -> FastGPTForCausalLM:
    return FastGPTForCausalLM(text_config())


def base_model() -> FastGPTModel:
    return FastGPTModel(text_config())


def captioner() -> FastGPTForConditionalGeneration:
    config = FastGPTVLConfig(text_config=text_config(), vision_config=VISION_CONFIG, image_seq_length=16)
    return FastGPTForConditionalGeneration(config)


BUILDERS = {"causal_lm": causal_lm, "base_model": base_model, "captioner": captioner}


def dynamic_attentions(model: nn.Module) -> list[nn.Module]:
    attentions = [module for module in model.modules() if hasattr(module, "memory_k")]
    assert attentions, "the model has no dynamic layer"
    return attentions


def normalised_hidden_states(hidden_size: int, rows: int = 512) -> torch.Tensor:
    """What an attention layer reads after its RMSNorm (weight 1): rows of root-mean-square 1."""
    hidden = torch.randn(rows, hidden_size, generator=torch.Generator().manual_seed(0))
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True))


def assert_memory_slots_at_projection_scale(attention: nn.Module) -> None:
    """Memory keys / values spread like the keys / values the layer projects from normalised hidden states, centred."""
    hidden = normalised_hidden_states(attention.k_proj.in_features)
    with torch.no_grad():
        for memory, projection in ((attention.memory_k, attention.k_proj), (attention.memory_v, attention.v_proj)):
            projected = projection(hidden)
            assert 0.85 < memory.std() / projected.std() < 1.15, (memory.std(), projected.std())
            assert memory.mean().abs() < 0.1 * memory.std()


def assert_compressors_are_the_identity(attention: nn.Module) -> None:
    for compressor in (attention.compress_k, attention.compress_v):
        torch.testing.assert_close(compressor.weight, torch.eye(attention.head_dim), rtol=0, atol=0)
        torch.testing.assert_close(compressor.bias, torch.zeros(attention.head_dim), rtol=0, atol=0)
    means = torch.randn(2, attention.config.num_key_value_heads, 3, attention.head_dim)
    with torch.no_grad():
        block_keys, block_values = attention.compress_blocks(means, 2 * means)
    torch.testing.assert_close(block_keys, means, rtol=0, atol=0)  # a block's entry is its mean key / value
    torch.testing.assert_close(block_values, 2 * means, rtol=0, atol=0)


def assert_gate_at_one_half(attention: nn.Module) -> None:
    torch.testing.assert_close(attention.mix_gate.bias, torch.zeros_like(attention.mix_gate.bias), rtol=0, atol=0)
    with torch.no_grad():
        gate = torch.sigmoid(attention.mix_gate(normalised_hidden_states(attention.mix_gate.in_features)))
    assert (gate.mean() - 0.5).abs() < 0.02 and (gate - 0.5).abs().max() < 0.2, gate


@pytest.mark.parametrize("builder", BUILDERS.values(), ids=BUILDERS.keys())
def test_memory_slots_start_at_the_scale_of_projected_keys_and_values(builder):
    torch.manual_seed(0)
    for attention in dynamic_attentions(builder()):
        assert_memory_slots_at_projection_scale(attention)


@pytest.mark.parametrize("builder", BUILDERS.values(), ids=BUILDERS.keys())
def test_compressors_start_at_the_identity_with_zero_bias(builder):
    torch.manual_seed(0)
    for attention in dynamic_attentions(builder()):
        assert_compressors_are_the_identity(attention)


@pytest.mark.parametrize("builder", BUILDERS.values(), ids=BUILDERS.keys())
def test_gate_starts_at_one_half_with_zero_bias(builder):
    torch.manual_seed(0)
    for attention in dynamic_attentions(builder()):
        assert_gate_at_one_half(attention)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    causal_lm().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("parameter", GLOBAL_BRANCH_PARAMETERS)
def test_checkpoint_missing_a_global_branch_parameter_is_refused_not_initialised(checkpoint, parameter):
    name = f"model.layers.1.self_attn.{parameter}"
    weights = load_file(checkpoint / "model.safetensors")
    weights.pop(name)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing from the checkpoint: {name}\n"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_tensors_reset_on_purpose_get_the_documented_initialisation(checkpoint):
    """`ignore_mismatched_sizes=True` re-initialises the mis-shaped memory slots and compressors (a wider head) the
    way a fresh model starts; the gate, which keeps its shape, is loaded."""
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "num_memory_tokens": 96, "head_dim": 32}))
    saved = load_file(checkpoint / "model.safetensors")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, ignore_mismatched_sizes=True)
    for index, attention in enumerate(model.model.layers):
        attention = attention.self_attn
        if not hasattr(attention, "memory_k"):
            continue
        assert attention.memory_k.shape == (96, 2, 32)
        assert_memory_slots_at_projection_scale(attention)
        assert_compressors_are_the_identity(attention)
        gate_weight = saved[f"model.layers.{index}.self_attn.mix_gate.weight"]
        torch.testing.assert_close(attention.mix_gate.weight, gate_weight, rtol=0, atol=0)
