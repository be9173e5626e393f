"""FastGPTConfig: defaults, presets, aliases, and the ValueErrors for every invalid value."""

import pytest
from transformers import AutoConfig, PreTrainedConfig

import fastgpt_hf  # noqa: F401  (registers the Auto classes)
from fastgpt_hf import FastGPTConfig
from fastgpt_hf.presets import PRESETS


def test_default_layout_is_three_stages_shallow_to_deep():
    config = FastGPTConfig(num_hidden_layers=16)
    assert config.layer_types == ["sliding_attention"] * 6 + ["dynamic_attention"] * 5 + ["full_attention"] * 5
    assert (config.sliding_window, config.dynamic_window) == (512, 1024)
    assert (config.num_memory_tokens, config.compress_block_size, config.max_position_embeddings) == (8, 64, 32768)


def test_aliases_become_transformers_names():
    config = FastGPTConfig.from_preset("tiny", layer_types=["global", "local", "dynamic"])
    assert config.layer_types == ["full_attention", "sliding_attention", "dynamic_attention"]


def test_derived_values():
    config = FastGPTConfig(hidden_size=256, num_attention_heads=8, num_hidden_layers=3)
    assert config.head_dim == 32 and config.num_key_value_heads == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_auto_config(tmp_path, name):
    config = FastGPTConfig.from_preset(name)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FastGPTConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()


def test_base_config_class_reads_a_fastgpt_config_json(tmp_path):
    """Trainer's resume_from_checkpoint reads config.json through the base class, which checks the layer kinds."""
    FastGPTConfig.from_preset("tiny").save_pretrained(tmp_path)
    read = PreTrainedConfig.from_json_file(tmp_path / "config.json")
    assert read.layer_types == FastGPTConfig.from_preset("tiny").layer_types


def test_preset_shapes_match_their_llama_namesakes():
    one_b, thirteen_b = FastGPTConfig.from_preset("1b"), FastGPTConfig.from_preset("13b")
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.num_attention_heads, one_b.num_key_value_heads) == (
        2048,
        16,
        32,
        8,
    )
    assert (thirteen_b.hidden_size, thirteen_b.num_hidden_layers, thirteen_b.intermediate_size) == (5120, 40, 13824)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown FastGPT preset 'huge'; choose one of \['125m', '13b', '1b'"):
        FastGPTConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_types": ["local", "banded", "global"]}, r"layer_types contains \['banded'\]; allowed are"),
        ({"layer_types": ["local", "global"]}, r"layer_types has 2 entries but num_hidden_layers is 3"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
        ({"compress_block_size": 32}, r"compress_block_size \(32\) must be at most dynamic_window \(16\)"),
        ({"sliding_window": 0}, r"sliding_window must be a positive integer, got 0"),
        ({"dynamic_window": -4}, r"dynamic_window must be a positive integer, got -4"),
        ({"num_memory_tokens": 0}, r"num_memory_tokens must be a positive integer, got 0"),
        ({"compress_block_size": 0}, r"compress_block_size must be a positive integer, got 0"),
        ({"hidden_size": 0}, r"hidden_size must be a positive integer, got 0"),
        ({"head_dim": 15}, r"head_dim must be even"),
        ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
        ({"hidden_act": "gleu"}, r"hidden_act 'gleu' is not one of Transformers' activations"),
        ({"attention_dropout": 2.0}, r"attention_dropout must be in \[0, 1\), got 2.0"),
        ({"pad_token_id": 500}, r"pad_token_id \(500\) must be a token id below vocab_size \(128\)"),
        ({"rope_parameters": {"rope_type": "lnear", "rope_theta": 1e4}}, r"rope_type'\] 'lnear' is unknown"),
        (
            {"hidden_size": 65},
            r"hidden_size \(65\) must be a multiple of num_attention_heads \(4\) to derive head_dim; .* set head_dim",
        ),
        ({"initializer_range": -0.02}, r"initializer_range must be a number >= 0 .* got -0.02"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a positive number, got 0.0"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps must be a positive number, got -1e-06"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}},
            r"rope_parameters\['rope_theta'\] must be a positive number, got 0.0",
        ),
        ({"rope_theta": -1e4}, r"rope_parameters\['rope_theta'\] must be a positive number, got -10000.0"),
        ({"num_sink_tokens": -1}, r"num_sink_tokens must be an integer >= 0 \(0 turns attention sinks off\), got -1"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(value),
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        FastGPTConfig.from_preset("tiny", **overrides)


def test_an_explicit_head_dim_needs_no_divisible_width():
    """Only a derived head_dim must divide the width (it would be floored silently); an explicit one sizes q_proj."""
    config = FastGPTConfig.from_preset("tiny", hidden_size=65, head_dim=16)
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (65, 4, 16)


def test_attention_sinks_are_off_by_default_and_round_trip(tmp_path):
    assert FastGPTConfig.from_preset("tiny").num_sink_tokens == 0
    FastGPTConfig.from_preset("tiny", num_sink_tokens=4).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).num_sink_tokens == 4
