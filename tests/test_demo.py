"""examples/demo.py without its training: the --long settings, the speed plot, and the files it writes."""

import importlib.util
import json
from pathlib import Path

import pytest

from fastgpt_hf.benchmarking import GenerationSpeed, speed_statistics
from fastgpt_hf.model_card import read_results

pytest.importorskip("matplotlib", reason="the demo plots with matplotlib (the `demo` extra)")
DEMO_PATH = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
LENGTHS = [512, 1024, 2048, 4096]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo", DEMO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_results(demo) -> dict:
    """What the demo's training processes and benchmarks return, with made-up numbers and 3 repeats per length."""
    results = {}
    for index, name in enumerate(demo.MODELS):
        speeds = [
            speed_statistics(
                [GenerationSpeed(length, 0.1 * repeat, 100.0 + repeat - index, length / 512) for repeat in (1, 2, 3)]
            )
            for length in LENGTHS
        ]
        results[name] = {
            "parameters": 1000 + index,
            "train_tokens_per_second": 2000.0,
            "perplexity": {"per_token": 123.456 + index, "per_word": 654.321, "nll": 1.0, "tokens": 900, "words": 400},
            "peak_rss_mib": 900.0,
            "losses": {5: 9.0, 10: 8.0},
            "speeds": speeds,
        }
    return results


def test_long_sets_more_steps_and_larger_batches_unless_given(demo):
    default, long, long_with_steps = (demo.parse_args(argv) for argv in ([], ["--long"], ["--long", "--steps", "7"]))
    assert (default.steps, default.batch_size, default.long) == (60, 4, False)
    assert (long.steps, long.batch_size, long.long) == (600, 8, True)
    assert (long_with_steps.steps, long_with_steps.batch_size) == (7, 8)
    assert long.block_size == default.block_size  # perplexities of both runs compare


def test_speed_plot_shows_the_median_and_a_min_max_band_from_zero_with_token_ticks(demo):
    figure = demo.speed_figure(fake_results(demo))
    speed_axes, cache_axes = figure.axes
    for axes in (speed_axes, cache_axes):
        assert axes.get_ylim()[0] == 0
        assert [label.get_text() for label in axes.get_xticklabels()] == ["512", "1,024", "2,048", "4,096"]
        assert len(axes.collections) == 2  # one fill_between band per model
    fastgpt_line = speed_axes.get_lines()[0]
    assert list(fastgpt_line.get_ydata()) == [102.0] * 4  # the median of 101, 102, 103
    band = speed_axes.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 101.0 and band.max() == 103.0


def test_result_files_hold_the_speed_repeats_the_sample_note_and_what_fastgpt_card_reads(demo, tmp_path):
    args = demo.parse_args(["--output", str(tmp_path)])
    results = fake_results(demo)
    run = demo.summary(args, results, " = Robert Boulter = gibberish", {"plots": 1.0}, 61.0)
    demo.write_result_files(tmp_path, demo.markdown_table(demo.table_rows(results, 4096)), run)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["results"]["fastgpt"]["speeds"][0]["decode_tokens_per_second"]["values"] == [101.0, 102.0, 103.0]
    assert written["results"]["llama"]["speeds"][3]["decode_tokens_per_second"]["min"] == 100.0
    assert (
        written["sample_note"]
        == "a 1-minute model: expect word salad; --long trains ~10 minutes for looser-but-English text"
    )
    markdown = (tmp_path / "results.md").read_text()
    assert (
        "expect word salad" in markdown
        and "| decode tokens/s at 4,096 context (median of 3) | 102.0 | 101.0 |" in markdown
    )
    per_token, per_word = read_results(tmp_path / "results.json")  # `fastgpt card --results` takes the file
    assert (per_token.metric_name, per_token.metric_value) == ("perplexity per token", 123.46)
    assert (per_word.metric_value, per_word.dataset_args) == (654.32, {"max_chars": 40_000})
