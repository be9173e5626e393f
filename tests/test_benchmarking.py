"""Generation speed measurements: the statistics of repeated runs that the demo plots and records."""

import pytest

from fastgpt_hf.benchmarking import GenerationSpeed, speed_statistics


def test_speed_statistics_give_median_min_max_and_values_of_each_figure():
    speeds = [GenerationSpeed(512, prefill, rate, 1.5) for prefill, rate in ((0.3, 90.0), (0.1, 120.0), (0.2, 100.0))]
    summary = speed_statistics(speeds)
    assert (summary["prompt_length"], summary["repeats"]) == (512, 3)
    assert summary["prefill_seconds"] == {"median": 0.2, "min": 0.1, "max": 0.3, "values": [0.3, 0.1, 0.2]}
    assert summary["decode_tokens_per_second"] == {
        "median": 100.0,
        "min": 90.0,
        "max": 120.0,
        "values": [90.0, 120.0, 100.0],
    }
    assert summary["cache_mib"]["median"] == summary["cache_mib"]["min"] == summary["cache_mib"]["max"] == 1.5


def test_speed_statistics_refuse_measurements_at_several_lengths():
    with pytest.raises(ValueError, match=r"one prompt length, got lengths \[512, 1024\]"):
        speed_statistics([GenerationSpeed(512, 0.1, 100.0, 1.0), GenerationSpeed(1024, 0.2, 90.0, 2.0)])
