"""Transformers' own common model tests (`ModelTesterMixin`, vendored from the 5.25.0 source distribution: NOTICE)
run against FastGPT, on a config whose three layers are one of each kind and whose windows and blocks the test
inputs cross (7 tokens; windows of 4, blocks of 2).

Every exemption is in `EXEMPTIONS`, with its reason; a test not listed there runs. `GenerationTesterMixin` and
`PipelineTesterMixin` are not in the source distribution in a form that runs here (NOTICE); FastGPT's own
tests/test_generation.py, tests/test_cache_rollback.py and the pipeline tests cover those doors.
"""

import unittest
from unittest.mock import patch

import pytest

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM, FastGPTModel

from .modeling_common import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
    ModelTesterMixin,
    ids_tensor,
    random_attention_mask,
)

# test name -> why FastGPT is exempt (and where Transformers exempts its own models the same way).
EXEMPTIONS: dict[str, str] = {
    "test_num_layers_is_small": (
        "The config holds one layer of each kind (sliding, dynamic, full): 3 layers where the test allows 2 unless "
        "the test class is in its table; Transformers lists its own three-kind models there for the same reason "
        "(Lfm3ModelTest, LaraMiniModelTest: 'one layer per token mixer')."
    ),
    **{
        f"test_model_rope_scaling_from_config_{index}_{scaling}": (
            "It runs an input of 1.5 x max_position_embeddings; FastGPT refuses inputs past max_position_embeddings "
            "with a ValueError by design (DESIGN.md section 3; a rope-scaled model raises max_position_embeddings "
            "with its rope_parameters). Transformers has no sliding-window model that refuses them to compare."
        )
        for index, scaling in enumerate(("linear", "dynamic", "yarn"))
    },
    "test_model_weights_reload_no_missing_tied_weights": (
        "It loads a checkpoint with every tensor removed and expects random weights; FastGPT's from_pretrained is "
        "strict by design and raises a ValueError naming every missing tensor (checkpoints.py, "
        "tests/test_strict_loading.py). Transformers has no such model to compare."
    ),
}

# The common tests take minutes on 2 cores: `make test` runs these quick ones (about a second each, measured:
# --durations), CI and `make test-all` all of them.
FAST_SUBSET = {
    "test_forward_signature",
    "test_model_get_set_embeddings",
    "test_save_load",
    "test_attention_outputs",
    "test_hidden_states_output",
    "test_training",
    "test_load_save_without_tied_weights",
    "test_bc_cache_name_forward",
    "test_resize_tokens_embeddings",
}


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
        # The tests pick labels and skip base models by Transformers' tables of model names, where a model of the
        # library is listed; FastGPT registers with the Auto classes instead, so it is listed for the test only.
        self.enterContext(patch.dict(MODEL_MAPPING_NAMES, {"fastgpt": "FastGPTModel"}))
        self.enterContext(patch.dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"fastgpt": "FastGPTForCausalLM"}))


def mark_test(test_name: str, mark: pytest.MarkDecorator) -> None:
    setattr(FastGPTModelTest, test_name, mark(getattr(FastGPTModelTest, test_name)))


for name in dir(FastGPTModelTest):
    if name in EXEMPTIONS:
        mark_test(name, pytest.mark.skip(reason=EXEMPTIONS[name]))
    elif name.startswith("test_") and callable(getattr(FastGPTModelTest, name)) and name not in FAST_SUBSET:
        mark_test(name, pytest.mark.slow)
