"""The quality harness (`benchmarks/quality.py`) end to end at its `test` size: every variant trains, is evaluated
and appears in every table of the report; `--report-only` rebuilds the report from the finished runs."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastgpt_hf.ablations import VARIANTS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def harness_module():
    """benchmarks/quality.py, with benchmarks/ on sys.path while it imports its recall_probe module."""
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.slow  # about 30 s on 2 cores: every variant trains and is evaluated
def test_every_variant_is_in_every_table(tmp_path):
    quality = harness_module()
    quality.run(parse(quality, ["--size", "test", "--seeds", "0", "--output", str(tmp_path)]))
    report = (tmp_path / "results.md").read_text(encoding="utf-8")
    tables = report.split("\n\n")
    rows = [[line for line in table.splitlines() if line.startswith("| `")] for table in tables]
    rows = [table for table in rows if table]
    assert len(rows) == 3  # perplexity and throughput, MQAR, pass key
    for table in rows:
        assert [line.split("`")[1] for line in table] == list(VARIANTS)
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert {run["variant"] for run in results["runs"]} == set(VARIANTS)
    assert all(
        run["tokens_per_second"] > 0 and run["perplexity"]["validation"]["per_word"] > 1 for run in results["runs"]
    )
    assert "not run: dynamic without memory slots" in report

    (tmp_path / "runs" / "llama-seed0.json").unlink()  # as if cut short before the Llama run finished
    (tmp_path / "results.md").unlink()
    quality.run(parse(quality, ["--report-only", "--output", str(tmp_path)]))
    assert "| `llama` |" not in (tmp_path / "results.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_recall_probe_trains_every_variant_on_mqar_alone(tmp_path):
    """`--recall-probe`: one record per variant and seed, with its final loss and the share of queries answered at
    1x and 4x the largest window, in recall-probe.json; `--layer-types` sets the base layout."""
    quality = harness_module()
    argv = ["--size", "test", "--recall-probe", "--variants", "llama", "dynamic", "selective", "--seeds", "0"]
    argv += ["--steps", "3"]
    layout = ["sliding_attention", "full_attention", "full_attention"]
    quality.run(parse(quality, [*argv, "--layer-types", *layout, "--output", str(tmp_path)]))
    results = json.loads((tmp_path / "recall-probe.json").read_text(encoding="utf-8"))
    assert sorted(path.name for path in (tmp_path / "probe-runs").glob("*.json")) == [
        "dynamic-seed0.json",
        "llama-seed0.json",
        "selective-seed0.json",
    ]
    assert results["shape"]["layer_types"] == layout
    window = max(results["shape"]["sliding_window"], results["shape"]["dynamic_window"])
    assert results["distances"] == {"1x": window, "4x": 4 * window}
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [
        ("llama", 0),
        ("dynamic", 0),
        ("selective", 0),
    ]
    for run in results["runs"]:
        assert set(run["accuracy"]) == {"1x", "4x"}
        assert all(0.0 <= share <= 1.0 for share in run["accuracy"].values())
        assert 0 < run["final_loss"] < 20
    assert list(results["means"]) == ["llama", "dynamic", "selective"]
    assert results["means"]["llama"]["accuracy"] == results["runs"][0]["accuracy"]  # one seed: its own figures


@pytest.mark.slow
def test_recall_probe_report_gathers_the_runs_of_several_calls(tmp_path):
    """Seeds run in two calls add up in one report, the means over them per variant; `--num-pairs` sets the pairs;
    `--report-only` rebuilds the report from the runs left (a run cut short leaves none)."""
    quality = harness_module()
    argv = ["--size", "test", "--recall-probe", "--variants", "llama", "--steps", "2", "--num-pairs", "3"]
    for seed in ("0", "1"):
        quality.run(parse(quality, [*argv, "--seeds", seed, "--output", str(tmp_path)]))
    results = json.loads((tmp_path / "recall-probe.json").read_text(encoding="utf-8"))
    assert results["probe"]["num_pairs"] == 3
    assert [(run["variant"], run["seed"]) for run in results["runs"]] == [("llama", 0), ("llama", 1)]
    runs, mean = results["runs"], results["means"]["llama"]
    assert mean["seeds"] == [0, 1]
    for label in ("1x", "4x"):
        assert len(runs[0]["accuracy_by_query"][label]) == 3
        assert mean["accuracy"][label] == pytest.approx((runs[0]["accuracy"][label] + runs[1]["accuracy"][label]) / 2)
    assert mean["curve"][-1]["loss"] == pytest.approx((runs[0]["final_loss"] + runs[1]["final_loss"]) / 2)
    report = (tmp_path / "recall-probe.md").read_text(encoding="utf-8")
    assert "| `llama` | 0, 1 |" in report and "Elimination level (3 pairs): 61.1% of the queries, 33.3%" in report

    (tmp_path / "probe-runs" / "llama-seed1.json").unlink()
    quality.run(parse(quality, ["--recall-probe", "--report-only", "--output", str(tmp_path)]))
    assert "| `llama` | 0 |" in (tmp_path / "recall-probe.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="no recall probe"):
        quality.run(parse(quality, ["--recall-probe", "--report-only", "--output", str(tmp_path / "empty")]))
    with pytest.raises(ValueError, match="other settings"):  # 2 pairs where the folder's runs have 3
        quality.run(parse(quality, [*argv[:-1], "2", "--seeds", "2", "--output", str(tmp_path)]))
    with pytest.raises(ValueError, match="Use fewer --num-pairs"):  # keys at least 2 x 16 tokens back, asked at 8
        quality.run(parse(quality, [*argv[:-1], "16", "--output", str(tmp_path / "dense")]))


@pytest.mark.slow  # about a minute on 2 cores: two compilations
def test_compiled_recall_probe_trains_as_the_eager_one(tmp_path):
    """`--recall-probe --compile` runs the same loop through the compiled forward (dynamo compiles graphs): the same
    losses as eager, to float32 rounding."""
    from torch._dynamo.utils import counters

    quality = harness_module()
    argv = ["--size", "test", "--recall-probe", "--variants", "llama", "dynamic", "--seeds", "0", "--steps", "20"]
    losses = {}
    for extra in ([], ["--compile"]):
        output = tmp_path / ("compiled" if extra else "eager")
        counters.clear()
        quality.run(parse(quality, [*argv, *extra, "--output", str(output)]))
        assert (counters["stats"]["unique_graphs"] > 0) == bool(extra)
        results = json.loads((output / "recall-probe.json").read_text(encoding="utf-8"))
        assert results["probe"]["compile"] == bool(extra)
        losses[bool(extra)] = [point["loss"] for run in results["runs"] for point in run["curve"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
