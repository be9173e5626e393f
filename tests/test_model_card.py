"""Model cards: the Hub metadata block, the layer table, the save hook and `fastgpt card`."""

import json

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard

from fastgpt_hf.model_card import build_model_card, card_main, read_results
from fastgpt_hf.quantization import precise_module_names

from .conftest import tiny_model

PERPLEXITY = {
    "dataset_type": "wikitext",
    "dataset_name": "WikiText-2",
    "dataset_config": "wikitext-2-raw-v1",
    "dataset_split": "test",
    "metric_type": "perplexity",
    "metric_value": 31.4,
}


def test_card_metadata_block_round_trips_through_the_hub_parser():
    model = tiny_model("mixed", dtype=torch.float32)
    card = build_model_card(
        model, "someone/fastgpt-tiny", results=[EvalResult(task_type="text-generation", **PERPLEXITY)]
    )
    metadata = ModelCard(str(card)).data  # what the Hub reads back from README.md
    assert metadata.library_name == "transformers"
    assert metadata.pipeline_tag == "text-generation"
    assert metadata.license == "apache-2.0"
    assert metadata.datasets == ["wikitext"]
    assert {"fastgpt", "custom_code"} <= set(metadata.tags)
    assert metadata.model_name == "someone/fastgpt-tiny"
    (result,) = metadata.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split) == ("text-generation", "wikitext", "test")
    assert (result.metric_type, result.metric_value) == ("perplexity", 31.4)


def test_card_body_lists_each_layer_with_window_and_sparsity():
    model = tiny_model("mixed", dtype=torch.float32)
    text = build_model_card(model, "someone/fastgpt-tiny").text
    windows = {"sliding_attention": "8", "dynamic_attention": "16", "full_attention": "all"}
    layers = zip(model.config.layer_types, model.attention_sparsity(4096), strict=True)
    for index, (layer_type, sparsity) in enumerate(layers):
        assert f"| {index} | `{layer_type}` | {windows[layer_type]} |" in text
        assert f"| {sparsity:.1%} |" in text.split(f"| {index} | `{layer_type}`")[1].splitlines()[0]
    assert "2 memory slots + 1 entry per 4 positions" in text
    assert 'from_pretrained("someone/fastgpt-tiny", trust_remote_code=True)' in text
    assert "import fastgpt_hf" in text
    assert all(f"`{name}`" in text for name in precise_module_names())
    assert "No evaluation results" in text
    for section in ("## Intended use", "## Limitations", "## Quantization", "## How to load"):
        assert section in text


def test_save_pretrained_writes_a_card_only_where_none_exists(tmp_path):
    model = tiny_model("mixed", dtype=torch.float32)
    model.save_pretrained(tmp_path / "fastgpt-tiny")
    readme = tmp_path / "fastgpt-tiny" / "README.md"
    assert ModelCard.load(readme).data.model_name == "fastgpt-tiny"
    readme.write_text("my own card")
    model.save_pretrained(tmp_path / "fastgpt-tiny")
    assert readme.read_text() == "my own card"


def test_card_command_writes_the_results_into_the_model_index(tmp_path, capsys):
    tiny_model("mixed", dtype=torch.float32).save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "results.json").write_text(json.dumps([PERPLEXITY]))
    card_main([str(tmp_path / "checkpoint"), "--results", str(tmp_path / "results.json"), "--model-id", "a/b"])
    card = ModelCard.load(tmp_path / "checkpoint" / "README.md")
    assert card.data.eval_results[0].metric_value == 31.4
    assert "| WikiText-2 | test | perplexity | 31.4 |" in card.text
    assert "wrote" in capsys.readouterr().out


def test_results_file_with_unknown_fields_is_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([{**PERPLEXITY, "score": 1.0}]))
    with pytest.raises(ValueError, match="may only use huggingface_hub.EvalResult's fields"):
        read_results(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"perplexity": 31.4}))
    with pytest.raises(ValueError, match="must hold a JSON list of objects"):
        read_results(tmp_path / "results.json")


def test_card_command_refuses_a_folder_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        card_main([str(tmp_path)])
    assert "is not a checkpoint folder (no config.json)" in capsys.readouterr().err
