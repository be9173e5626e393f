"""Model cards: the Hub metadata block, the layer table, the save hook and `fastgpt card`."""

import json
import re

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard

from fastgpt_hf.cli import main as fastgpt_main
from fastgpt_hf.data import Perplexity, load_tokenizer
from fastgpt_hf.model_card import (
    SHIPPED_VALIDATION_DATASET,
    build_model_card,
    card_main,
    perplexity_results,
    read_results,
)
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


def test_card_window_column_names_the_attention_sinks():
    model = tiny_model("mixed", dtype=torch.float32, num_sink_tokens=4)
    text = build_model_card(model, "someone/fastgpt-tiny").text
    windows = {"sliding_attention": "8 + the first 4 tokens", "dynamic_attention": "16 + the first 4 tokens"}
    windows["full_attention"] = "all"
    for index, layer_type in enumerate(model.config.layer_types):
        assert f"| {index} | `{layer_type}` | {windows[layer_type]} |" in text


def test_captioning_model_is_saved_with_the_card_of_its_task(tmp_path):
    """The captioning model saves through the same mixin: a card whose task, loading class and layer table are the
    captioner's (its language model's layers)."""
    from .test_multimodal import build_model, tiny_processor

    model = build_model(tiny_processor())
    model.save_pretrained(tmp_path / "captioner")
    card = ModelCard.load(tmp_path / "captioner" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.model_name == "captioner"
    assert "captioning model" in card.text and "`siglip_vision_model`" in card.text
    assert 'AutoModelForImageTextToText.from_pretrained("captioner", trust_remote_code=True)' in card.text
    sparsities = model.model.language_model.attention_sparsity(4096)
    for index, layer_type in enumerate(model.config.text_config.layer_types):
        assert f"| {index} | `{layer_type}` |" in card.text and f"| {sparsities[index]:.1%} |" in card.text


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


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(json.dumps({"perplexity": 31.4}), id="object-without-eval_results"),
        pytest.param(json.dumps({"eval_results": {"perplexity": 31.4}}), id="eval_results-not-a-list"),
        pytest.param(json.dumps([31.4]), id="list-of-numbers"),
        pytest.param("perplexity 31.4", id="not-json"),
    ],
)
def test_results_in_any_other_form_are_refused_with_the_accepted_forms(content, tmp_path):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError, match=r"must hold a JSON list of objects with huggingface_hub.EvalResult fields"):
        read_results(tmp_path / "results.json")
    with pytest.raises(ValueError, match="results file not found"):
        read_results(tmp_path / "absent.json")


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = load_tokenizer()
    tiny_model("mixed", dtype=torch.float32, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_card_takes_the_results_fastgpt_eval_writes(checkpoint_with_tokenizer, tmp_path, capsys):
    results = tmp_path / "eval.json"
    fastgpt_main(
        ["eval", str(checkpoint_with_tokenizer), "--window", "32", "--max-chars", "2000", "--json", str(results)]
    )
    printed = re.search(
        r"per token ([\d.]+) \((\d+) tokens\), per word ([\d.]+) \((\d+) words\)", capsys.readouterr().out
    )
    per_token, tokens, per_word, words = float(printed[1]), int(printed[2]), float(printed[3]), int(printed[4])
    by_name = {result.metric_name: result for result in read_results(results)}
    assert by_name["perplexity per token"].metric_value == round(per_token, 2)
    assert by_name["perplexity per token"].metric_args == {"window": 32, "stride": 16, "tokens": tokens}
    assert by_name["perplexity per word"].metric_value == round(per_word, 2)
    assert by_name["perplexity per word"].metric_args == {"window": 32, "stride": 16, "words": words}
    assert by_name["perplexity per word"].dataset_split == "validation"  # the shipped excerpt, as no --file was given
    assert by_name["perplexity per word"].dataset_args == {"max_chars": 2000}
    card_main([str(checkpoint_with_tokenizer), "--results", str(results)])
    card = ModelCard.load(checkpoint_with_tokenizer / "README.md")
    assert len(card.data.eval_results) == 2
    assert f"| validation | perplexity per word | {round(per_word, 2)} |" in card.text


def test_card_takes_the_results_fastgpt_bench_writes(tmp_path, capsys):
    results = tmp_path / "bench.json"
    bench = ["bench", "--preset", "tiny", "--lengths", "20", "40", "--new-tokens", "3", "--json", str(results)]
    fastgpt_main(bench)
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[0] == "FastGPT"]
    read = read_results(results)
    assert len(read) == 3 * 2  # FastGPT's three figures at each length; the Llama peer is not this model's result
    for index, (_, length, first_token, tokens_per_second, cache_mib) in enumerate(printed):
        figures = read[3 * index : 3 * index + 3]
        assert {result.dataset_name for result in figures} == {f"random {length}-token prompt"}
        values = [result.metric_value for result in figures]
        assert values == pytest.approx([float(first_token), float(tokens_per_second), float(cache_mib)], abs=0.051)
        assert figures[1].metric_args == {"batch_size": 1, "new_tokens": 3, "device": "cpu"}


def test_card_takes_the_eval_results_of_a_demo_results_file(tmp_path):
    perplexity = Perplexity(per_token=101.234, per_word=250.5, nll=1.0, tokens=900, words=400)
    eval_results = perplexity_results(perplexity, SHIPPED_VALIDATION_DATASET, 256, 128)
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"steps": 60}, "eval_results": eval_results}))
    per_token, per_word = read_results(tmp_path / "results.json")
    assert (per_token.metric_value, per_word.metric_value) == (101.23, 250.5)
    assert (per_word.dataset_type, per_word.dataset_name) == ("wikitext", "WikiText-2 (validation excerpt)")


def test_card_command_refuses_a_folder_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        card_main([str(tmp_path)])
    assert "is not a checkpoint folder (no config.json)" in capsys.readouterr().err
