"""Benchmarks: the statistics the demo records, the harness's timing and floor arithmetic, and every subcommand of
`benchmarks/bench.py` run once at a tiny size, so that a broken subcommand fails here rather than on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.benchmarking import GenerationSpeed, speed_statistics
from fastgpt_hf.data import CORPUS_FILES, load_tokenizer
from fastgpt_hf.training import model_for_tokenizer

from .test_conversion import build_source

REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARKS = REPOSITORY / "benchmarks"
HARNESS_MODULES = ("bench", "timing", "floors", "models")
SUBCOMMAND_PARTS = ("recall_probe",)  # a part of one subcommand's module (quality), in a module of its own


@pytest.fixture(scope="module")
def harness():
    """`benchmarks/` importable for this module: (bench, timing, floors, models); taken off sys.path afterwards."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield tuple(__import__(name) for name in HARNESS_MODULES)
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in [*HARNESS_MODULES, *SUBCOMMAND_PARTS, *__import__("bench").SUBCOMMANDS]:
            sys.modules.pop(name, None)


def run_bench(harness, argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `bench.py *argv`, run in this process."""
    status = harness[0].main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows of `output` whose first cell is `first_cell`."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines() if line.startswith("|")
    ]
    return [row for row in rows if row[0] == first_cell]


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


def test_timing_warms_up_then_takes_the_median_of_the_timed_calls(harness, monkeypatch):
    timing = harness[1]
    durations = iter([0.0, 0.0, 5.0, 1.0, 3.0])  # seconds each call takes: two warm-up calls, then three timed
    clock = {"now": 0.0, "calls": 0}

    def call() -> None:
        clock["now"] += next(durations)
        clock["calls"] += 1

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    assert timing.median_ms(call, "cpu", repeats=3, warmup=2) == 3000.0
    assert clock["calls"] == 5
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        timing.times_ms(call, "cpu", repeats=0)


def test_prefill_floor_counts_dense_and_computed_attention_flops(harness):
    floors = harness[2]
    config = FastGPTConfig.from_preset("tiny", layer_types=["full_attention"] * 3)
    model = FastGPTForCausalLM(config)
    dense = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    length = 64
    causal_entries = length * (length + 1) // 2  # a query at position i scores i + 1 keys
    attention = 3 * 4 * config.num_attention_heads * config.head_dim * causal_entries
    assert floors.prefill_flops(model, length) == pytest.approx(2 * dense * length + attention)
    head = 2 * config.vocab_size * config.hidden_size * length
    assert floors.training_flops(model, 2, length) == pytest.approx(3 * 2 * (2 * dense * length + attention + head))
    windowed = FastGPTForCausalLM(FastGPTConfig.from_preset("tiny", layer_types=["sliding_attention"] * 3))
    assert floors.prefill_flops(windowed, length) < floors.prefill_flops(model, length)
    assert floors.compute_floor_ms(2e12, tflops=1000.0) == pytest.approx(2.0)


def test_decode_floor_reads_every_weight_once_and_an_untied_embedding_by_the_row(harness):
    floors = harness[2]
    tied = FastGPTForCausalLM(FastGPTConfig.from_preset("tiny", tie_word_embeddings=True))
    untied = FastGPTForCausalLM(FastGPTConfig.from_preset("tiny", tie_word_embeddings=False))
    all_bytes = {model: sum(p.numel() * p.element_size() for p in model.parameters()) for model in (tied, untied)}
    embedding = untied.get_input_embeddings().weight
    assert floors.decode_weight_bytes(tied) == all_bytes[tied]
    assert floors.decode_weight_bytes(untied) == all_bytes[untied] - embedding.numel() * embedding.element_size()
    assert floors.bytes_floor_ms(3e9, bandwidth_gbs=1000.0) == pytest.approx(3.0)


def test_cache_bytes_of_full_layers_match_llama_and_windows_hold_less(harness):
    floors = harness[2]
    full = FastGPTConfig.from_preset("tiny", layer_types=["full_attention"] * 3)
    layers, heads, dim = full.num_hidden_layers, full.num_key_value_heads, full.head_dim
    assert floors.llama_cache_bytes(full, 100) == 2 * layers * heads * dim * 100 * 2
    assert floors.llama_cache_bytes(full, 100, torch.float32) == 2 * floors.llama_cache_bytes(full, 100)
    # Full layers hold every key and value, as Llama's, beside at most a flag byte per position and layer.
    extra = floors.fastgpt_cache_bytes(full, 100) - floors.llama_cache_bytes(full, 100)
    assert 0 <= extra <= layers * 100
    sliding = FastGPTConfig.from_preset("tiny", layer_types=["sliding_attention"] * 3)
    assert floors.fastgpt_cache_bytes(sliding, 100) == floors.fastgpt_cache_bytes(sliding, 1000)


def test_datasheet_peaks_are_found_by_the_device_name(harness):
    floors = harness[2]
    assert floors.datasheet_peaks("NVIDIA H100 80GB HBM3")["memory_gbs"] == 3350.0
    assert floors.datasheet_peaks("NVIDIA H200")["memory_gbs"] == 4800.0
    assert floors.datasheet_peaks("CPU, 2 threads") is None


def test_model_options_give_shapes_and_configs(harness):
    bench, models = harness[0], harness[3]
    assert models.parse_shape("2048") == (1, 2048)
    assert models.parse_shape("8x2048") == models.parse_shape("8:2048") == (8, 2048)
    assert models.config_override('layer_types=["sliding_attention"]') == ("layer_types", ["sliding_attention"])
    assert models.config_override("attn_implementation=sdpa") == ("attn_implementation", "sdpa")
    parser = bench.argparse.ArgumentParser()
    models.add_model_arguments(parser, preset="tiny")
    args = parser.parse_args(["--set", "sliding_window=4", "--layers", "2", "--layer-kind", "dynamic_attention"])
    config = models.fastgpt_config(args)
    assert (config.sliding_window, config.layer_types) == (4, ["dynamic_attention"] * 2)


def test_every_subcommand_is_listed_once_with_a_module_of_its_name(harness):
    bench = harness[0]
    for name in bench.SUBCOMMANDS:
        assert (BENCHMARKS / f"{name}.py").is_file(), name
    modules = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert modules - set(bench.SUBCOMMANDS) == {*HARNESS_MODULES, *SUBCOMMAND_PARTS}


def test_prefill_prints_both_models_with_ratio_and_floor_per_shape_cache_and_training_step(harness, capsys):
    argv = ["prefill", "--device", "cpu", "--preset", "tiny", "--shapes", "24", "2x16", "--train", "2x16"]
    argv += ["--backends", "sdpa", "--caches", "none", "dynamic", "static", "--repeats", "1"]
    status, output, _ = run_bench(harness, argv, capsys)
    assert status == 0
    assert "copy" in output and "TFLOP/s" in output
    for shape in ("1 x 24", "2 x 16"):
        (row,) = table_rows(output, shape)[:1]
        assert row[1].endswith("(sdpa, eager)") and row[3].endswith("x")
    (training,) = [row for row in table_rows(output, "2 x 16") if row[1] == "sdpa"]
    assert training[4].endswith("x")
    assert [row[1] for row in table_rows(output, "24")] == ["none", "dynamic", "static"]


def test_prefill_training_step_with_gradient_checkpointing_counts_the_second_forward(harness, capsys, monkeypatch):
    """`--gradient-checkpointing`: both models recompute their layers in backward, the header says so, and the floor
    adds the layers' forward FLOPs once more (floors.training_flops)."""
    argv = ["prefill", "--device", "cpu", "--preset", "tiny", "--shapes", "--train", "2x16", "--repeats", "1"]
    models, pairs = harness[3], []
    build_pair = models.model_pair
    monkeypatch.setattr(models, "model_pair", lambda *args: pairs.append(build_pair(*args)) or pairs[-1])
    for extra in ([], ["--gradient-checkpointing"]):
        status, output, _ = run_bench(harness, [*argv, *extra], capsys)
        assert status == 0
        assert ("layers recomputed in backward" in output) == bool(extra)
        assert all(model.is_gradient_checkpointing == bool(extra) for model in pairs[-1].values())
        (training,) = [row for row in table_rows(output, "2 x 16") if row[1] == "sdpa"]
        assert training[4].endswith("x") and float(training[5]) > 0
    model = FastGPTForCausalLM(FastGPTConfig.from_preset("tiny"))
    floors = harness[2]
    assert floors.training_flops(model, 2, 16, recompute_layers=True) == pytest.approx(
        floors.training_flops(model, 2, 16) + 2 * floors.prefill_flops(model, 16)
    )


def test_decode_prints_ms_per_token_floor_and_ratio_per_setting(harness, capsys):
    argv = ["decode", "--device", "cpu", "--preset", "tiny", "--shapes", "1x24", "2x8", "--settings", "dynamic"]
    status, output, _ = run_bench(harness, argv, capsys)
    assert status == 0
    for shape in ("1 x 24", "2 x 8"):
        (row,) = table_rows(output, shape)
        llama, fastgpt, floor, versus, times_floor = row[1:]
        assert llama.endswith(" s") and fastgpt.endswith(" s") and " / " in floor
        assert versus.endswith("x") and times_floor.endswith("x")


@pytest.mark.slow
def test_decode_times_every_way_of_decoding_in_a_table_of_its_own(harness, capsys):
    argv = ["decode", "--device", "cpu", "--preset", "tiny", "--shapes", "2x16", "--settings", "default"]
    status, output, _ = run_bench(
        harness, [*argv, "--modes", "greedy", "sample", "beam", "stream", "left-padded"], capsys
    )
    assert status == 0
    tables = output.split("Decoding: ")[1:]
    assert [table.split("\n")[0] for table in tables] == ["greedy", "sample", "beam", "stream", "left-padded"]
    for table in tables:
        (row,) = table_rows(table, "2 x 16")
        assert all(cell.endswith(" s") for cell in row[1:3])  # both models timed, none failed


def test_decode_refuses_left_padding_at_batch_1_and_zero_steps(harness, capsys):
    argv = ["decode", "--device", "cpu", "--preset", "tiny", "--shapes", "1x16", "4x16", "--modes", "left-padded"]
    with pytest.raises(SystemExit, match="a batch of 1 would time greedy decoding"):
        run_bench(harness, argv, capsys)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_bench(harness, ["decode", "--ops", "--steps", "0"], capsys)
    assert "--steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_decode_refuses_an_int8_cache_where_fastgpt_decodes_with_its_dynamic_cache(harness, capsys):
    argv = ["decode", "--device", "cpu", "--preset", "tiny", "--shapes", "1x16", "--settings", "static", "default"]
    with pytest.raises(SystemExit, match=r"the settings \['default'\] decode with its dynamic cache here \(cpu\)"):
        run_bench(harness, [*argv, "--kv-cache", "int8"], capsys)


def test_decode_modes_set_sampling_beams_padding_and_a_streamer_that_reads_every_step(harness):
    import decode

    prompt = torch.ones(3, 8, dtype=torch.long)
    assert decode.setting_config("default", prompt, 5).do_sample is False
    sample = decode.setting_config("default", prompt, 5, "sample")
    assert (sample.do_sample, sample.top_k, sample.top_p) == (True, 50, 0.95)
    assert decode.setting_config("static", prompt, 5, "beam").num_beams == decode.NUM_BEAMS
    chunked = decode.setting_config("static", prompt, 5, "beam", {"prefill_chunk_size": 4})
    assert (chunked.num_beams, chunked.prefill_chunk_size) == (decode.NUM_BEAMS, 4)
    mask = decode.prompt_mask(prompt, "left-padded")
    assert mask[0].tolist() == [1] * 8 and mask[1].tolist() == mask[2].tolist() == [0, 0] + [1] * 6
    assert bool(decode.prompt_mask(prompt, "stream").all())
    streamer = decode.HostStreamer()
    model = FastGPTForCausalLM(FastGPTConfig.from_preset("tiny")).eval()
    seen = []
    streamer.end = lambda: seen.extend(streamer.tokens)  # what the stream held when generate() ended it
    model.generate(prompt[:1], generation_config=decode.greedy_config(4), streamer=streamer)
    assert len(seen) == 1 + 4 and seen[0] == [[1] * 8]  # the prompt, then each new token, read on the host


def test_decode_counts_operators_of_one_step_per_layer_kind(harness, capsys):
    argv = ["decode", "--ops", "--device", "cpu", "--preset", "tiny", "--layers", "2", "--shapes", "1x20"]
    status, output, _ = run_bench(harness, [*argv, "--steps", "2"], capsys)
    assert status == 0
    rows = {row[0]: row for row in table_rows(output, "sliding_attention") + table_rows(output, "dynamic_attention")}
    assert set(rows) == {"sliding_attention", "dynamic_attention"}
    assert int(rows["dynamic_attention"][2].split()[0]) > int(rows["sliding_attention"][2].split()[0])


def test_decode_profile_lists_the_costliest_operators_of_a_step(harness, capsys):
    argv = ["decode", "--profile", "--cache", "dynamic", "--device", "cpu", "--preset", "tiny", "--shapes", "1x16"]
    status, output, _ = run_bench(harness, [*argv, "--steps", "2", "--rows", "3"], capsys)
    assert status == 0
    assert output.count("one decode step:") == 2 and "aten::" in output


def test_memory_prints_every_preset_and_measured_cache_bytes(harness, capsys):
    argv = ["memory", "--context", "4096", "--device", "cpu", "--preset", "tiny", "--shapes", "1x40"]
    status, output, _ = run_bench(harness, argv, capsys)
    assert status == 0
    for preset in ("tiny", "small", "125m", "1b", "13b"):
        (row,) = table_rows(output, preset)
        assert float(row[4]) < 1.0  # FastGPT's state is smaller than Llama's at 4K
    (measured,) = table_rows(output, "1 x 40")
    assert float(measured[3]) < 1.0


def test_reference_errors_are_rounding_sized_on_the_cpu(harness, capsys):
    status, output, _ = run_bench(harness, ["reference", "--device", "cpu", "--length", "40"], capsys)
    assert status == 0
    for backend in ("eager", "sdpa", "flex_attention"):
        errors = {row[1]: float(row[2]) for row in table_rows(output, backend)}
        assert errors["float64"] < 1e-12 and errors["float32"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
@pytest.mark.parametrize("subcommand", ["prefill", "decode", "memory --shapes 1x8", "reference"])
def test_cuda_subcommands_skip_with_a_message_without_a_gpu(harness, capsys, subcommand):
    status, output, error = run_bench(harness, [*subcommand.split(), "--device", "cuda"], capsys)
    assert status == 0
    assert "skipped: --device cuda: this machine has no CUDA device" in error


def test_a_subcommand_whose_dependency_is_missing_is_skipped_by_name(harness, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx now raises ModuleNotFoundError
    sys.modules.pop("serve", None)
    status, _, error = run_bench(harness, ["serve"], capsys)
    sys.modules.pop("serve", None)
    assert status == 0
    assert "bench.py serve: skipped" in error and "httpx" in error


@pytest.mark.slow
def test_quantization_compares_every_scheme_and_qat_with_float32(harness, capsys, tmp_path):
    tokenizer = load_tokenizer()
    model_for_tokenizer("tiny", tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    valid = tmp_path / "valid.txt"
    valid.write_text("".join(CORPUS_FILES["validation"].read_text().splitlines(keepends=True)[:6]))
    argv = ["quantization", str(tmp_path / "model"), "--valid-file", str(valid), "--window", "32", "--stride", "16"]
    argv += ["--qat-steps", "1", "--block-size", "32", "--prompt-length", "16", "--new-tokens", "3"]
    status, output, _ = run_bench(harness, argv, capsys)
    assert status == 0
    assert [row[0] for row in table_rows(output, "fp32")] == ["fp32"]
    assert table_rows(output, "QAT int8") and table_rows(output, "fp32 +1 steps")


def test_convert_compares_source_and_conversion(harness, capsys, tmp_path):
    from fastgpt_hf.conversion import convert

    source = build_source(tmp_path / "source")
    convert(source, tmp_path / "converted")
    text = tmp_path / "text.txt"
    text.write_text(CORPUS_FILES["validation"].read_text()[:3000])
    argv = ["convert", str(source), f"converted={tmp_path / 'converted'}", "--text", str(text), "--windows", "64"]
    argv += ["48", "--passkey-length", "96", "--distances", "40", "--trials", "1", "--new-tokens", "2"]
    argv += ["--decode-context", "48"]
    status, output, _ = run_bench(harness, argv, capsys)
    assert status == 0
    assert len(table_rows(output, "source")) == 3 and len(table_rows(output, "converted")) == 2
    assert "perplexity per word, 64 window | perplexity per word, 48 window" in output
    decode = {tuple(row[:2]): row for row in table_rows(output, "source") + table_rows(output, "converted")}
    assert set(decode) >= {("source", "default"), ("source", "static"), ("converted", "default")}
    assert all(float(row[2]) > 0 for row in decode.values())
    # The source holds float32 keys and values of every layer at all 48 positions.
    config = AutoConfig.from_pretrained(source)
    source_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 48 * 4
    assert float(decode["source", "default"][5]) == pytest.approx(source_bytes / 2**20, abs=0.001)
    assert float(decode["converted", "default"][5]) > 0


@pytest.mark.slow
def test_export_measures_both_pte_files(harness, capsys, tmp_path):
    pytest.importorskip("executorch", reason="ExecuTorch comes with the edge extra: pip install 'fastgpt_hf[edge]'")
    argv = ["export", "--presets", "tiny", "--contexts", "16", "--dtypes", "float32", "--new-tokens", "3"]
    status, output, _ = run_bench(harness, [*argv, "--prefill-chunk", "8", "--output-dir", str(tmp_path)], capsys)
    assert status == 0
    lines = [line.split() for line in output.splitlines() if line.strip().startswith("tiny")]
    assert [line[2] for line in lines] == ["FastGPT", "Llama"]


@pytest.mark.slow
def test_serve_load_test_answers_every_request(harness, capsys):
    pytest.importorskip("httpx", reason="the serve extra (pip install fastgpt_hf[serve])")
    argv = ["serve", "--preset", "tiny", "--requests", "3", "--concurrency", "2", "--rows", "2", "--prompt-tokens"]
    status, output, _ = run_bench(
        harness, [*argv, "8", "--reply-tokens", "4", "--time-limit", "120", "--skip-llama"], capsys
    )
    assert status == 0
    (line,) = [line for line in output.splitlines() if line.startswith("FastGPT (fastgpt serve")]
    assert line.split()[5:7] == ["3", "3"]  # sent, done


@pytest.mark.slow  # Llama's generate_batch takes about 40 s for these 5 tiny requests on 2 CPU cores
def test_serve_engine_only_compares_the_engines_and_times_each_part(harness, capsys):
    argv = ["serve", "--engine-only", "--preset", "tiny", "--requests", "5", "--rows", "2", "--prompt-tokens", "8"]
    status, output, _ = run_bench(harness, [*argv, "--reply-tokens", "3"], capsys)
    assert status == 0
    rows = {line.split("(")[0].strip(): line.split() for line in output.splitlines() if "(" in line and "  " in line}
    assert rows["FastGPT"][-4] == rows["Llama"][-4] == "5"  # requests answered by each engine
    assert float(rows["FastGPT"][-1]) > 0 and float(rows["Llama"][-1]) > 0  # tokens/s
    parts = {line.rsplit(None, 3)[0] for line in output.splitlines()[-3:]}
    assert parts == {"prefill (forward and copies into rows)", "decode step", "choose tokens"}


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
@pytest.mark.slow
def test_parallel_modes_match_one_device_under_torchrun():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(BENCHMARKS / "bench.py"), "parallel", "--preset", "tiny", "--device", "cpu", "--dtype", "float32"]
    command += ["--global-batch-size", "4", "--seq-len", "16", "--parity-seq-len", "16", "--timed-steps", "1"]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY / "src"), environment.get("PYTHONPATH", "")])
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()}
    for mode in ("ddp", "fsdp2", "tp", "pp"):
        assert float(rows[mode][2]) < 1e-4 and float(rows[mode][3]) < 1e-4, rows[mode]  # loss and gradient errors
