"""FastGPT against a LlamaForCausalLM of the same shape on one CUDA device: prefill, decode, memory, floors.

Both models get random bf16 weights of the preset's shape (`1b` is Llama-3.2-1B's shape, `13b` Llama-2-13B's).
- Ceilings, measured first: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate.
- Prefill (`--prefill`): `bench_prefill.py`'s table at batch 1 (each model's fastest attention backend and setting:
  eager, replayed from a CUDA graph, with `--compile-prefill` also compiled; floor = FLOPs / rate; the longest
  length's device time split by kernel kind). `bench_prefill.py` itself adds batched shapes and training steps.
- Decode (`--decode B:C ...`): ms per generated token at batch B after a C-token prompt, through `generate()`, in
  each setting (`--settings`; by default "default", no cache or compile argument, what `model.generate(input_ids)`
  does, and "static", the static cache compiled with CUDA graphs), the shapes run one after the other in each
  setting as in a user's process, with the first call's seconds (compilation included) beside each figure and the
  graphs dynamo compiled over all shapes. Inductor's on-disk cache starts empty (a fresh TORCHINDUCTOR_CACHE_DIR
  unless set), so first calls compile from nothing; each compiled setting's first call is then timed once more
  after `torch._dynamo.reset()`, with that cache warm.
  ms/token = (time of 65 new tokens - time of 2) / 63, each the faster of two calls after the first, on the same
  cache size: the prefill and the first decode step cancel (explicit static: generate() builds a new static cache
  per call, at new addresses, so its first compiled step records the CUDA graphs again).
  Floor = (weight bytes + cache bytes) / bandwidth: one step must read every weight (an untied input embedding
  only by the row) and the whole cache of the context.
- `--weights bf16 int8`: decode with bf16 weights, and/or with torchao int8 weight-only Linear layers (FastGPT's
  precise modules and lm_head skipped, as `fastgpt_hf.quantization` declares).
`--results FILE` appends the tables, the command and the device to a markdown file.

    python benchmarks/bench_gpu.py --preset 1b --decode 1:2048 1:32640 32:8192
    python benchmarks/bench_gpu.py --preset 1b --prefill
    python benchmarks/bench_gpu.py --preset 13b --decode 32:1024 --weights int8
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from bench_prefill import BACKENDS, matmul_tflops, median_ms, prefill_table
from cache_bytes import fastgpt_cache_bytes, llama_cache_bytes
from torch._dynamo.utils import counters
from transformers import CompileConfig, GenerationConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.quantization import precise_module_names, weight_bytes
from fastgpt_hf.training import llama_config

# generate() settings: "default" passes no cache or compile argument (what `model.generate(input_ids)` and pipelines
# do: FastGPT's compiled static cache on CUDA, `generation_fast_path`; Llama's eager dynamic cache); "dynamic" the
# eager dynamic cache (FastGPT's default before); "static" the static cache sized to the call, compiled with
# CUDA graphs; "static-autotune" that compiled in inductor's max-autotune mode: only there does inductor use its
# triton matmul templates, into which it can fuse the int8 -> bf16 conversion of torchao's weight-only Linear
# layers; otherwise it converts the whole weight before cuBLAS.
SETTINGS = ("default", "dynamic", "static", "static-autotune")
DEFAULT_SETTINGS = ("default", "static")
NEW_TOKENS = 65
BASELINE_TOKENS = 2  # the prefill and one decode step, the one that may record CUDA graphs


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written, GB/s."""
    source = torch.randn(2**29, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / median_ms(lambda: target.copy_(source)) / 1e6


def greedy_config(new_tokens: int, cache_implementation: str | None = None, **options) -> GenerationConfig:
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


def setting_config(setting: str, prompt: torch.Tensor, new_tokens: int) -> GenerationConfig:
    if setting in ("default", "dynamic"):
        return greedy_config(new_tokens, None if setting == "default" else "dynamic")
    compile_config = CompileConfig(mode="max-autotune" if setting == "static-autotune" else "reduce-overhead")
    max_cache_len = prompt.shape[1] + NEW_TOKENS
    return greedy_config(new_tokens, "static", max_cache_len=max_cache_len, compile_config=compile_config)


def generate_ms(model, prompt: torch.Tensor, new_tokens: int, setting: str, repeats: int = 2) -> float:
    """Least wall ms of `repeats` `generate()` calls for `new_tokens` greedy tokens (the static setting's cache
    sized for NEW_TOKENS either way)."""
    config = setting_config(setting, prompt, new_tokens)
    attention_mask = torch.ones_like(prompt)
    times = []
    for _ in range(repeats):
        # Transformers sizes a new StaticCache to the largest one the model had (to spare a recompile), so a shorter
        # shape after a longer one would time the longer cache; each shape gets its own size.
        model.__dict__.pop("_previous_max_cache_length", None)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=attention_mask, generation_config=config)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


@dataclass
class DecodeTiming:
    ms_per_token: float
    peak_gib: float  # this model's weights plus what generate() allocated
    first_two_ms: float  # a warm call's prefill and first decode step
    first_call_s: float  # the first call of this setting at this shape: compilation included, if any


def decode_timing(model, prompt: torch.Tensor, setting: str) -> DecodeTiming:
    """One setting at one shape: the first call (timed on its own, and the warm-up), then ms per token.

    Prints the figures as soon as they are known, so that a run cut short still reports its finished settings."""
    first_call_s = generate_ms(model, prompt, NEW_TOKENS, setting, repeats=1) / 1e3
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    full = generate_ms(model, prompt, NEW_TOKENS, setting)
    baseline = generate_ms(model, prompt, BASELINE_TOKENS, setting)
    ms_per_token = (full - baseline) / (NEW_TOKENS - BASELINE_TOKENS)
    peak = (weight_bytes(model) + torch.cuda.max_memory_allocated() - resident) / 2**30
    print(
        f"  {type(model).__name__} {setting} {prompt.shape[0]} x {prompt.shape[1]}: {ms_per_token:.2f} ms/token, "
        f"first call {first_call_s:.1f} s, first 2 tokens {baseline:.0f} ms, peak {peak:.1f} GiB",
        flush=True,
    )
    return DecodeTiming(ms_per_token, peak, baseline, first_call_s)


def setting_timings(model, prompts: dict, setting: str) -> tuple[dict, str]:
    """Every shape in one setting, compiled state kept from shape to shape (as in a user's process): each shape's
    `DecodeTiming` (None where it failed, reported), and a note of the graphs dynamo compiled over all shapes and,
    for the default setting, of its first call once more after `torch._dynamo.reset()` (inductor's on-disk cache
    then warm)."""
    torch._dynamo.reset()
    counters.clear()
    timings = {}
    for shape, prompt in prompts.items():
        try:
            timings[shape] = decode_timing(model, prompt, setting)
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            print(f"  {type(model).__name__} {setting} {shape}: failed: {type(error).__name__}: {str(error)[:200]}")
            timings[shape] = None
    graphs = counters["stats"]["unique_graphs"]
    note = f"{graphs} graphs compiled over {len(prompts)} shapes"
    if graphs and setting == "default":
        torch._dynamo.reset()
        shape, prompt = next(iter(prompts.items()))
        again_s = generate_ms(model, prompt, NEW_TOKENS, setting, repeats=1) / 1e3
        note += f", first call again with the compile cache warm {again_s:.1f} s ({shape[0]} x {shape[1]})"
    torch._dynamo.reset()
    return timings, note


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
    """One row per (batch, context): per model and setting, ms per token / tokens per second / first call's seconds
    (compilation included); the floors; FastGPT's default against the fastest Llama setting and against its floor."""
    device = next(iter(models.values())).device
    generator = torch.Generator(device=device).manual_seed(0)
    prompts = {
        (batch, context): torch.randint(0, config.vocab_size, (batch, context), device=device, generator=generator)
        for batch, context in shapes
    }
    timings, notes = {}, []
    for setting in settings:
        for name, model in models.items():
            timings[name, setting], note = setting_timings(model, prompts, setting)
            notes.append(f"- {name} {setting}: {note}")
            print(notes[-1], flush=True)
    columns = [(name, setting) for name in models for setting in settings]
    fastgpt = next(name for name in models if name.startswith("FastGPT"))
    llama = next(name for name in models if name.startswith("Llama"))
    header = " | ".join(f"{name} {setting}" for name, setting in columns)
    rows = [
        f"| batch x context | {header} | floor ms {llama} / {fastgpt} | {fastgpt} default vs fastest {llama} "
        f"| {fastgpt} default x floor |",
        "| --- |" + " ---: |" * (len(columns) + 3),
    ]
    for shape in shapes:
        batch, context = shape
        cells = []
        for column in columns:
            timing = timings[column][shape]
            if timing is None:
                cells.append("failed")
                continue
            tokens_per_second = batch * 1e3 / timing.ms_per_token
            cells.append(f"{timing.ms_per_token:.2f} / {tokens_per_second:,.0f} / {timing.first_call_s:.1f} s")
        floors = {
            name: (decode_weight_bytes(models[name]) + batch * cache_bytes(config, context)) / (bandwidth * 1e6)
            for name, cache_bytes in ((llama, llama_cache_bytes), (fastgpt, fastgpt_cache_bytes))
        }
        fast = timings.get((fastgpt, "default"), {}).get(shape)
        llama_times = [timings[llama, setting][shape] for setting in settings if timings[llama, setting][shape]]
        versus = floor_ratio = "-"
        if fast is not None and llama_times:
            versus = f"{min(timing.ms_per_token for timing in llama_times) / fast.ms_per_token:.2f}x"
        if fast is not None:
            floor_ratio = f"{fast.ms_per_token / floors[fastgpt]:.1f}x"
        rows.append(
            f"| {batch} x {context} | {' | '.join(cells)} | {floors[llama]:.2f} / {floors[fastgpt]:.2f} | {versus} "
            f"| {floor_ratio} |"
        )
    legend = (
        "Cells: ms per token / tokens per second / first call's seconds (prefill, compilation if any and 65 "
        "tokens), settings kept from shape to shape in the order of the rows."
    )
    return [*rows, "", legend, *notes]


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
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
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
