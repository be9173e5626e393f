"""Transformers' own common model tests (`ModelTesterMixin`, vendored from the 5.24.0 source distribution: NOTICE)
run against FastGPT, on a config whose three layers are one of each kind and whose windows and blocks the test
inputs cross (7 tokens; windows of 4, blocks of 2).

Every exemption is in `EXEMPTIONS`, with its reason; a test not listed there runs. `GenerationTesterMixin` and
`PipelineTesterMixin` are not in the source distribution in a form that runs here (NOTICE); FastGPT's own
tests/test_generation.py, tests/test_cache_rollback.py and the pipeline tests cover those doors.
"""

import unittest

import pytest
import torch

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, FastGPTModel

from .modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

# test name -> why FastGPT is exempt (and where Transformers exempts its own sliding-window models the same way).
EXEMPTIONS: dict[str, str] = {}


class FastGPTModelTester:
    """Builds the tiny config and inputs the common tests ask for."""

    def __init__(self, parent: unittest.TestCase):
        self.parent = parent
        self.batch_size = 2
        self.seq_length = 7
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 3
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37

    def get_config(self) -> FastGPTConfig:
        return FastGPTConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            layer_types=["sliding_attention", "dynamic_attention", "full_attention"],
            sliding_window=4,
            dynamic_window=4,
            compress_block_size=2,
            num_memory_tokens=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[FastGPTConfig, dict]:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class FastGPTModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (FastGPTModel, FastGPTForCausalLM)

    def setUp(self) -> None:
        self.model_tester = FastGPTModelTester(self)


def exempt(test_name: str, reason: str) -> None:
    setattr(FastGPTModelTest, test_name, pytest.mark.skip(reason=reason)(getattr(FastGPTModelTest, test_name)))


for name, why in EXEMPTIONS.items():
    exempt(name, why)
