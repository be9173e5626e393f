"""FastGPT against a LlamaForCausalLM of the same shape on one CUDA device: prefill, decode, memory, floors.

Both models get random bf16 weights of the preset's shape (`1b` is Llama-3.2-1B's shape, `13b` Llama-2-13B's).
- Ceilings, measured first: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate.
- Prefill (`--prefill`): `bench_prefill.py`'s table at batch 1 (each model's fastest attention backend and setting:
  eager, replayed from a CUDA graph, with `--compile-prefill` also compiled; floor = FLOPs / rate; the longest
  length's device time split by kernel kind). `bench_prefill.py` itself adds batched shapes and training steps.
- Decode (`--decode B:C ...`): ms per generated token at batch B after a C-token prompt, through `generate()`, with
  each generate setting (dynamic cache eager; static cache, which generate() compiles with CUDA graphs; with
  `--settings static-autotune`, the static cache compiled in max-autotune mode) and the fastest reported.
  ms/token = (time of 65 new tokens - time of 2) / 63 on the same cache size: the prefill and the first decode step
  cancel (generate() builds a new static cache per call, at new addresses, so its first compiled step records the
  CUDA graphs again). The time of those first 2 tokens is printed beside each setting.
  Floor = (weight bytes + cache bytes) / bandwidth: one step must read every weight (an untied input embedding
  only by the row) and the whole cache of the context.
- `--weights bf16 int8`: decode with bf16 weights, and/or with torchao int8 weight-only Linear layers (FastGPT's
  precise modules and lm_head skipped, as `fastgpt_hf.quantization` declares).
`--results FILE` appends the tables, the command and the device to a markdown file.

    python benchmarks/bench_gpu.py --preset 1b --prefill --decode 1:2048 1:32640 32:8192
    python benchmarks/bench_gpu.py --preset 13b --decode 32:1024 --weights int8
"""

import argparse
import sys
import time

import torch
from bench_prefill import BACKENDS, matmul_tflops, median_ms, prefill_table
from cache_bytes import fastgpt_cache_bytes, llama_cache_bytes
from transformers import CompileConfig, GenerationConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.quantization import precise_module_names, weight_bytes
from fastgpt_hf.training import llama_config

# generate() settings: the cache, and for "static-autotune" the static cache compiled in inductor's max-autotune mode
# (CUDA graphs too): only there does inductor use its triton matmul templates, into which it can fuse the int8 ->
# bf16 conversion of torchao's weight-only Linear layers; otherwise it converts the whole weight before cuBLAS.
SETTINGS = ("dynamic", "static", "static-autotune")
DEFAULT_SETTINGS = ("dynamic", "static")
NEW_TOKENS = 65
BASELINE_TOKENS = 2  # the prefill and one decode step, the one that may record CUDA graphs


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written, GB/s."""
    source = torch.randn(2**29, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / median_ms(lambda: target.copy_(source)) / 1e6


def greedy_config(new_tokens: int, cache_implementation: str, **options) -> GenerationConfig:
    """Greedy decoding of exactly `new_tokens` tokens (no end-of-sequence stop) with that cache; `options` add to it."""
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation=cache_implementation,
        **options,
    )


def generate_ms(model, prompt: torch.Tensor, new_tokens: int, setting: str, repeats: int = 3) -> float:
    """Median wall ms of `generate()` for `new_tokens` greedy tokens, cache sized for NEW_TOKENS either way."""
    if setting == "dynamic":
        config = greedy_config(new_tokens, "dynamic")
    else:
        compile_config = CompileConfig(mode="max-autotune" if setting == "static-autotune" else "reduce-overhead")
        max_cache_len = prompt.shape[1] + NEW_TOKENS
        config = greedy_config(new_tokens, "static", max_cache_len=max_cache_len, compile_config=compile_config)
    attention_mask = torch.ones_like(prompt)
    # Transformers sizes a new StaticCache to the largest one the model had (to spare a recompile), so a shorter
    # shape after a longer one would time the longer cache; each shape gets its own size.
    model.__dict__.pop("_previous_max_cache_length", None)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, attention_mask=attention_mask, generation_config=config)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def decode_ms_per_token(model, prompt: torch.Tensor, setting: str) -> tuple[float, float, float]:
    """(ms per decode step, peak GiB of this model's weights plus what generate() allocates, ms of the first 2
    tokens: the prefill and one step) for one setting.

    The first calls warm up compile and CUDA graphs. Other models held on the device are not counted. Prints the
    figures and the seconds of the warm-up and of the timed calls as soon as they are known, so that a run cut short
    still reports its finished settings and a slow compile shows where the time went."""
    start = time.perf_counter()
    with torch.no_grad():
        generate_ms(model, prompt, NEW_TOKENS, setting, repeats=2)
        warm = time.perf_counter()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full = generate_ms(model, prompt, NEW_TOKENS, setting)
        baseline = generate_ms(model, prompt, BASELINE_TOKENS, setting)
    timed_seconds = time.perf_counter() - warm
    ms_per_token = (full - baseline) / (NEW_TOKENS - BASELINE_TOKENS)
    peak = weight_bytes(model) + torch.cuda.max_memory_allocated() - resident
    print(
        f"  {type(model).__name__} {setting}: {ms_per_token:.2f} ms/token, first 2 tokens {baseline:.0f} ms, "
        f"peak {peak / 2**30:.1f} GiB; warm-up {warm - start:.0f} s, timed {timed_seconds:.0f} s",
        flush=True,
    )
    return ms_per_token, peak / 2**30, baseline


def best_decode(model, prompt: torch.Tensor, settings: list[str]) -> tuple[float, str, float, dict] | None:
    """(fastest ms/token, its setting, its peak GiB, every setting's (ms/token, ms of the first 2 tokens)); a failing
    setting is reported, not fatal; None when every setting failed."""
    timings = {}
    for setting in settings:
        try:
            timings[setting] = decode_ms_per_token(model, prompt, setting)
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            print(f"  {type(model).__name__} {setting}: failed: {type(error).__name__}: {str(error)[:200]}")
        torch._dynamo.reset()
    if not timings:
        return None
    setting = min(timings, key=lambda name: timings[name][0])
    every = {name: (ms, first_ms) for name, (ms, _, first_ms) in timings.items()}
    return timings[setting][0], setting, timings[setting][1], every


def decode_weight_bytes(model) -> int:
    """Weight bytes a decode step reads: all of them but an untied input embedding, of which it reads one row."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def keep_inductor_from_int8pack_mm() -> None:
    """Keep inductor from rewriting torchao's int8 weight-only matmul (`mm(x, int8_weight.t().to(bf16)) * scale`)
    into `aten._weight_int8pack_mm`: on CUDA (torch 2.11) that kernel computes in float32 without tensor cores, and a
    compiled 16 x 5120 -> 13824 layer took 2.71 ms against 0.24 ms eager (H200). Inductor registers the rewrite with
    its oneDNN CPU fusions, once per process at the first compile, and only while oneDNN is enabled: call this before
    anything compiles. oneDNN serves CPU operators only, which these GPU benchmarks do not time. Inductor's FX graph
    cache does not key on the switch: a graph compiled earlier with the rewrite is loaded again
    (`TORCHINDUCTOR_FX_GRAPH_CACHE=0` on a machine where one may be cached)."""
    torch.backends.mkldnn.enabled = False


def int8_weight_only(model: torch.nn.Module) -> torch.nn.Module:
    """torchao int8 weight-only (per-channel) on every Linear except lm_head and the modules kept precise."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    skipped = {*precise_module_names(), "lm_head"}

    def quantized(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skipped

    # set_inductor_config=False: torchao's recommended inductor settings turn on coordinate-descent tuning of every
    # kernel, and compiling the 13b decode graph with them ran past the 10-minute call limit on the H200.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=quantized)
    return model


def decode_table(
    models: dict, config: FastGPTConfig, shapes: list[tuple[int, int]], bandwidth: float, settings: list[str]
) -> list[str]:
    """One row per (model, batch, context): fastest setting, ms/token, tokens/s, floor, peak memory; per setting
    its ms/token and the ms of its first 2 tokens (prefill and one step)."""
    rows = [
        "| model | batch x context | ms/token (setting) | tokens/s | floor ms | x floor | peak GiB "
        "| per setting: ms/token / first 2 tokens ms |"
    ]
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for batch, context in shapes:
        device = next(iter(models.values())).device
        prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
        speeds = {}
        for name, model in models.items():
            cache_bytes = (llama_cache_bytes if "Llama" in name else fastgpt_cache_bytes)(config, context)
            floor_ms = (decode_weight_bytes(model) + batch * cache_bytes) / (bandwidth * 1e6)
            best = best_decode(model, prompt, settings)
            if best is None:
                rows.append(f"| {name} | {batch} x {context} | every setting failed (above) | | | | | |")
                continue
            ms, setting, gib, every = best
            speeds[name] = ms
            per_setting = ", ".join(f"{key} {ms:.2f} / {first_ms:.0f}" for key, (ms, first_ms) in every.items())
            rows.append(
                f"| {name} | {batch} x {context} | {ms:.2f} ({setting}) | {batch * 1e3 / ms:.0f} | {floor_ms:.2f} | "
                f"{ms / floor_ms:.1f} | {gib:.1f} | {per_setting} |"
            )
            print(rows[-1], flush=True)
        for name in speeds:
            if name.startswith("FastGPT"):
                peer = name.replace("FastGPT", "Llama")
                print(f"  {name} vs {peer} at {batch} x {context}: {speeds[peer] / speeds[name]:.2f}x", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--prefill", type=int, nargs="*", help="prefill lengths (default 2048 8192 32768 if given)")
    parser.add_argument("--compile-prefill", action="store_true", help="also time prefill under torch.compile")
    parser.add_argument("--decode", nargs="*", default=[], help="BATCH:CONTEXT pairs, e.g. 1:2048 32:8192")
    parser.add_argument(
        "--weights", nargs="+", default=["bf16"], choices=("bf16", "int8"), help="decode with these weights"
    )
    parser.add_argument(
        "--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS, help="generate() settings"
    )
    parser.add_argument("--results", help="markdown file to append the tables to")
    args = parser.parse_args()
    keep_inductor_from_int8pack_mm()
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(args.preset)
    bandwidth, peak = copy_bandwidth_gbs(), matmul_tflops()
    header = (
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; copy {bandwidth:.0f} GB/s, "
        f"bf16 matmul {peak:.0f} TFLOP/s; preset {args.preset}"
    )
    print(header, flush=True)
    torch.set_default_dtype(torch.bfloat16)  # random init straight on the GPU in bf16: seconds, even at 13b
    with torch.device("cuda"):
        fastgpt = FastGPTForCausalLM(config).eval()
        llama = LlamaForCausalLM(llama_config(config)).eval()
    torch.set_default_dtype(torch.float32)
    sections = []
    if args.prefill is not None:
        lengths = args.prefill or [2048, 8192, 32768]
        settings = ["eager", "cuda graph", *(["compiled"] if args.compile_prefill else [])]
        sections.append(prefill_table(fastgpt, llama, [(1, length) for length in lengths], peak, BACKENDS, settings))
    shapes = [tuple(int(part) for part in shape.split(":")) for shape in args.decode]
    for batch, context in shapes:
        if context + NEW_TOKENS > config.max_position_embeddings:
            parser.error(
                f"--decode {batch}:{context}: the prompt and {NEW_TOKENS} new tokens exceed the preset's "
                f"max_position_embeddings ({config.max_position_embeddings}); use a context of at most "
                f"{config.max_position_embeddings - NEW_TOKENS}."
            )
    if shapes and "bf16" in args.weights:
        sections.append(
            decode_table({"Llama bf16": llama, "FastGPT bf16": fastgpt}, config, shapes, bandwidth, args.settings)
        )
    if shapes and "int8" in args.weights:
        quantized = {"FastGPT int8": int8_weight_only(fastgpt), "Llama int8": int8_weight_only(llama)}
        sections.append(decode_table(quantized, config, shapes, bandwidth, args.settings))
    if args.results:
        with open(args.results, "a") as results:
            command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])
            results.write(f"\n`{command}`\n\n{header}\n\n" + "\n\n".join("\n".join(rows) for rows in sections) + "\n")


if __name__ == "__main__":
    main()
