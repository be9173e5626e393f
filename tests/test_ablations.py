"""Each peer and ablation of the quality harness is what it claims: its layout, its overrides, its parameters zeroed
or frozen (and kept so by Trainer's optimizer), everything else as the `dynamic` variant it ablates."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from fastgpt_hf.ablations import VARIANTS, variant_config, variant_layer_types, variant_model
from fastgpt_hf.configuration_fastgpt import DYNAMIC, FULL, SELECTIVE, SLIDING
from fastgpt_hf.modeling_fastgpt import FastGPTForCausalLM
from fastgpt_hf.presets import PRESETS
from fastgpt_hf.recall_tasks import SequenceMeanTrainer
from fastgpt_hf.training import training_arguments

SHAPE = {**PRESETS["tiny"], "num_hidden_layers": 6}  # default layout: 2 sliding, 2 dynamic, 2 full


def frozen_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def test_layouts():
    base = [SLIDING, SLIDING, DYNAMIC, DYNAMIC, FULL, FULL]
    assert variant_layer_types("default", base) == base
    assert variant_layer_types("sliding", base) == [SLIDING] * 6
    assert variant_layer_types("no_full", base) == [SLIDING, SLIDING] + [DYNAMIC] * 4
    assert variant_layer_types("llama", base) == [FULL] * 6
    assert variant_layer_types("selective", base) == [SLIDING, SLIDING] + [SELECTIVE] * 4
    with pytest.raises(ValueError, match="Unknown layout"):
        variant_layer_types("global", base)


def test_peers_have_the_claimed_layers_and_nothing_frozen():
    llama = variant_model("llama", SHAPE)
    assert isinstance(llama, LlamaForCausalLM) and llama.config.hidden_size == SHAPE["hidden_size"]
    fastgpt = variant_model("fastgpt", SHAPE)
    assert (
        isinstance(fastgpt, FastGPTForCausalLM)
        and fastgpt.config.layer_types == [SLIDING] * 2 + [DYNAMIC] * 2 + [FULL] * 2
    )
    assert variant_model("sliding", SHAPE).config.layer_types == [SLIDING] * 6
    dynamic = variant_model("dynamic", SHAPE)
    assert FULL not in dynamic.config.layer_types and dynamic.config.layer_types.count(DYNAMIC) == 4
    selective = variant_model("selective", SHAPE)
    assert selective.config.layer_types == [SLIDING] * 2 + [SELECTIVE] * 4
    assert selective.state_dict().keys() == dynamic.state_dict().keys()  # the dynamic layer's parameters
    peers = ("llama", "fastgpt", "sliding", "dynamic", "selective")
    assert not any(frozen_names(variant_model(name, SHAPE)) for name in peers)


def test_null_memory_is_one_zero_slot_frozen():
    model = variant_model("dynamic-null-memory", SHAPE)
    assert (
        model.config.num_memory_tokens == 1 and model.config.layer_types == variant_config("dynamic", SHAPE).layer_types
    )
    memory = [(name, parameter) for name, parameter in model.named_parameters() if "memory_" in name]
    assert len(memory) == 8 and all(parameter.shape[0] == 1 and not parameter.any() for _, parameter in memory)
    assert frozen_names(model) == {name for name, _ in memory}


def test_empty_blocks_are_zeroed_frozen_compressors():
    model = variant_model("dynamic-empty-blocks", SHAPE)
    compressors = {name for name in dict(model.named_parameters()) if ".compress_" in name}
    assert len(compressors) == 16 and frozen_names(model) == compressors
    assert not any(model.get_parameter(name).any() for name in compressors)


def test_fixed_gate_stays_at_its_initialisation_through_training(tmp_path):
    model = variant_model("dynamic-fixed-gate", SHAPE, seed=3)
    gates = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if "mix_gate" in name}
    assert len(gates) == 8 and frozen_names(model) == set(gates)
    reference = variant_model("dynamic", SHAPE, seed=3)  # the same initialisation, the gate free
    assert all(torch.equal(gate, reference.get_parameter(name)) for name, gate in gates.items())
    query_before = model.model.layers[2].self_attn.q_proj.weight.detach().clone()
    blocks = torch.randint(0, SHAPE["vocab_size"], (4, 24)).tolist()
    args = training_arguments(tmp_path, max_steps=2, batch_size=2, precision="fp32", show_progress=False)
    trainer = SequenceMeanTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    )
    trainer.train()
    assert all(torch.equal(model.get_parameter(name), gate) for name, gate in gates.items())
    assert not torch.equal(model.model.layers[2].self_attn.q_proj.weight, query_before)


def test_every_variant_differs_from_every_other():
    signatures = set()
    for name in VARIANTS:
        model = variant_model(name, SHAPE)
        layers = getattr(model.config, "layer_types", None)
        signatures.add((type(model).__name__, tuple(layers or ()), getattr(model.config, "num_memory_tokens", None),
                        tuple(sorted(frozen_names(model)))))  # fmt: skip
    assert len(signatures) == len(VARIANTS)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="Unknown variant"):
        variant_model("nsa", SHAPE)
