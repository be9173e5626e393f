"""Decode of FastGPT against a LlamaForCausalLM of the same shape: ms per token through generate(), its floor, and
with `--profile` or `--ops` where a step's time goes.

Both models get random weights of the preset's shape (bf16 on a GPU, float32 on a CPU).
- Default: ms per generated token at batch B after a C-token prompt (`--shapes BxC ...`), through `generate()`, in
  each setting of `--settings`: "default" passes no cache or compile argument (what `model.generate(input_ids)` and
  pipelines do: FastGPT's compiled static cache on CUDA, `generation_fast_path`; Llama's eager dynamic cache);
  "dynamic" the eager dynamic cache; "static" the static cache sized to the call, compiled with CUDA graphs;
  "static-autotune" that compiled in inductor's max-autotune mode (only there does inductor fuse the int8 -> bf16
  conversion of torchao's weight-only Linear layers into its matmul templates). The shapes run one after the other
  in each setting as in a user's process, with the first call's seconds (compilation included) beside each figure
  and the graphs dynamo compiled over all shapes. Inductor's on-disk cache starts empty (a fresh
  TORCHINDUCTOR_CACHE_DIR unless set), so first calls compile from nothing; the default setting's first call is then
  timed once more after `torch._dynamo.reset()`, with that cache warm.
  ms/token = (time of 65 new tokens - time of 2) / 63, each the faster of two calls after the first, on the same
  cache size: the prefill and the first decode step cancel (explicit static: generate() builds a new static cache
  per call, at new addresses, so its first compiled step records the CUDA graphs again).
  Floor = (weight bytes + cache bytes) / measured copy bandwidth: one step must read every weight (an untied input
  embedding only by the row) and the whole cache of the context (`floors.py`).
  `--modes`: one table per way of decoding, greedy by default; sampling, beam search, a streamer reading each
  step's tokens on the host and left-padded rows are what issue 23 asks to be as fast as greedy decoding.
  `--weights bf16 int8 int8-dynamic`: decode with the preset's weights, and/or with torchao int8 Linear layers:
  weight-only (`int8`: int8 weights converted to the activations' dtype for the matmul) or int8 activations and
  weights (`int8-dynamic`: per-token activation scales, int8 x int8 matmuls through `torch._int_mm`); FastGPT's
  precise modules and lm_head skipped, as `fastgpt_hf.quantization` declares. Each scheme quantizes freshly built
  models.
  `--kv-cache int8`: FastGPT's static cache keeps int8 keys and values with float32 scales
  (`generate(..., cache_config={"kv_quantization": "int8"})`, `fastgpt_hf.cache_quantization`), in the static
  settings and on CUDA the default one; Llama keeps Transformers' static cache in the model's dtype, which has no int8
  form (the table names each model's cache). The floor counts each model's cache bytes.
  `--prefill-chunk N`: both models prefill in chunks of N tokens (`generate(..., prefill_chunk_size=N)`), whose
  activations then take a fraction of a whole prompt's: the peak of a large batch x context (`13b` at 32 x 1K).
- `--profile`: where a generate() decode step spends its time, both models (`--cache static`: generate()'s own
  compile, CUDA graphs on a GPU: the compiled graphs, graph breaks and CUDA graph skips, and per decode step the
  CUDA graph launches and single kernel launches; then the kernels of one step, compiled without CUDA graphs (same
  kernels), from two profiled generate() calls of `--steps` and twice that many tokens; `--cache dynamic`:
  generate()'s eager dynamic cache, with the wall time per step beside the kernel time).
- `--ops`: for each layer kind (or `--layer-kind`), `--layers` layers of it: after the context (fed in chunks of
  1,024 through each model's default cache) the operators one one-token forward dispatches (views, which launch
  nothing, apart) and the median wall ms of `--steps` such steps: what an eager, launch-bound step costs.

    python benchmarks/bench.py decode --preset 1b --shapes 1x2048 1x32640 32x8192
    python benchmarks/bench.py decode --preset 1b --shapes 1x2048 32x8192 --settings default \
        --modes greedy sample beam stream left-padded
    python benchmarks/bench.py decode --preset 13b --shapes 16x1024 --weights int8 --settings static
    python benchmarks/bench.py decode --preset 13b --shapes 32x1024 --weights int8-dynamic --settings default static
    python benchmarks/bench.py decode --preset 13b --shapes 32x1024 --weights int8-dynamic --settings static \
        --kv-cache int8 --prefill-chunk 256
    python benchmarks/bench.py decode --preset 13b --layers 6 --shapes 32x1024 --profile
    python benchmarks/bench.py decode --device cpu --preset tiny --layers 8 --shapes 1x256 --ops --threads 1
"""

import argparse
import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import floors
import models
import torch
from timing import call_ms, first_call_seconds, median_ms, times_ms
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from fastgpt_hf.cli import positive_int
from fastgpt_hf.configuration_fastgpt import LAYER_TYPES
from fastgpt_hf.quantization import precise_module_names, weight_bytes

SETTINGS = ("default", "dynamic", "static", "static-autotune")
DEFAULT_SETTINGS = ("default", "static")
NEW_TOKENS = 65
BASELINE_TOKENS = 2  # the prefill and one decode step, the one that may record CUDA graphs
PREFILL_CHUNK = 1024
INT8_SCHEMES = ("int8", "int8-dynamic")
# How generate() decodes (`--modes`): what issue 23 asks to be as fast as greedy decoding on the default path.
MODES = ("greedy", "sample", "beam", "stream", "left-padded")
NUM_BEAMS = 4
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}
SHORT_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
KV_CACHES = ("model", "int8")  # `--kv-cache`: keys and values in the model's dtype, or int8 (FastGPT only)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_model_arguments(parser, preset="1b")
    parser.add_argument("--shapes", nargs="+", default=["1x2048"], help="BATCHxCONTEXT, e.g. 1x2048 32x8192")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["bf16"],
        choices=("bf16", *INT8_SCHEMES),
        help="bf16: --dtype's weights (bf16 on a GPU); int8: torchao weight-only Linear layers; int8-dynamic: "
        "torchao int8 activations and weights",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["greedy"],
        choices=MODES,
        help="how generate() decodes, one table each: greedy; sample (top-k 50, top-p 0.95, temperature 0.8); beam "
        f"({NUM_BEAMS} beams); stream (greedy with a streamer that reads each step's tokens on the host, as "
        "TextIteratorStreamer does); left-padded (greedy, every row after the first padded by a quarter of the "
        "context)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=KV_CACHES,
        default="model",
        help="FastGPT's cache keys and values in the tables: the model's dtype (bf16 on a GPU), or int8 with float32 "
        "scales (static settings, and default on CUDA; Llama's cache stays in the model's dtype)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        help="both models prefill the prompt in chunks of this many tokens (generate()'s prefill_chunk_size): a lower "
        "peak for a large batch x context",
    )
    parser.add_argument("--profile", action="store_true", help="where a decode step's time goes, both models")
    parser.add_argument("--cache", choices=("static", "dynamic"), default="static", help="--profile's cache")
    parser.add_argument("--ops", action="store_true", help="operators and ms of one eager step, per layer kind")
    parser.add_argument(
        "--steps", type=positive_int, default=8, help="--profile: decode steps profiled; --ops: steps timed"
    )
    parser.add_argument("--rows", type=positive_int, default=15, help="--profile: kernels listed per model")


def run(args: argparse.Namespace) -> None:
    device, dtype = models.device_and_dtype(args)
    shapes = [models.parse_shape(shape) for shape in args.shapes]
    if args.ops:
        operator_table(args, device, dtype, shapes)
        return
    check_kv_cache_settings(args.kv_cache, args.settings, device)
    if "left-padded" in args.modes and min(batch for batch, _ in shapes) < 2:
        raise SystemExit(
            "--modes left-padded pads every row after the first, so a batch of 1 would time greedy decoding under "
            "another name: give shapes of batch 2 or more (e.g. 32x8192)."
        )
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    if device.type == "cuda":
        keep_inductor_from_int8pack_mm()
    config = models.fastgpt_config(args)
    for batch, context in shapes:
        if context + NEW_TOKENS > config.max_position_embeddings:
            raise SystemExit(
                f"--shapes {batch}x{context}: the prompt and {NEW_TOKENS} new tokens exceed max_position_embeddings "
                f"({config.max_position_embeddings}); use a context of at most "
                f"{config.max_position_embeddings - NEW_TOKENS} or --set max_position_embeddings=..."
            )
    header, bandwidth, _ = floors.device_header(device, dtype)
    print(f"{header}; preset {args.preset}, layers {config.layer_types}", flush=True)
    pair = models.model_pair(config, device, dtype)
    if args.profile:
        profile_models(args, pair, shapes)
        return
    pair_is_quantized = False
    for weights in args.weights:
        if pair_is_quantized:  # quantization is in place: start again from the preset's weights
            del pair
            pair = models.model_pair(config, device, dtype)
        if weights != "bf16":
            pair = {name: int8_quantized(model, weights) for name, model in pair.items()}
        pair_is_quantized = weights != "bf16"
        label = SHORT_DTYPE_NAMES[dtype] if weights == "bf16" else weights
        if args.kv_cache == "int8":  # which cache each model keeps, in every column's name
            kv_labels = {"FastGPT": "kv-int8", "Llama": f"kv-{SHORT_DTYPE_NAMES[dtype]}"}
            named = {f"{name} {label} {kv_labels[name]}": model for name, model in pair.items()}
        else:
            named = {f"{name} {label}": model for name, model in pair.items()}
        for mode in args.modes:
            decode_table(named, config, shapes, bandwidth, args.settings, mode, args.kv_cache, args.prefill_chunk)


def check_kv_cache_settings(kv_cache: str, settings: list[str], device: torch.device) -> None:
    """Exit with a message where `--kv-cache int8` meets a setting whose FastGPT cache is the dynamic one, which has
    no int8 form: "dynamic", and "default" off CUDA."""
    dynamic = [
        setting for setting in settings if setting == "dynamic" or (setting == "default" and device.type != "cuda")
    ]
    if kv_cache == "int8" and dynamic:
        raise SystemExit(
            f"--kv-cache int8 quantizes FastGPT's static cache; the settings {dynamic} decode with its dynamic cache "
            f"here ({device.type}), which has none. Use --settings static (or default on CUDA)."
        )


def keep_inductor_from_int8pack_mm() -> None:
    """Keep inductor from rewriting torchao's int8 weight-only matmul (`mm(x, int8_weight.t().to(bf16)) * scale`)
    into `aten._weight_int8pack_mm`: on CUDA (torch 2.11) that kernel computes in float32 without tensor cores, and a
    compiled 16 x 5120 -> 13824 layer took 2.71 ms against 0.24 ms eager (H200). Inductor registers the rewrite with
    its oneDNN CPU fusions, once per process at the first compile, and only while oneDNN is enabled: call this before
    anything compiles. oneDNN serves CPU operators only, which the GPU runs do not time. Inductor's FX graph cache
    does not key on the switch: a graph compiled earlier with the rewrite is loaded again
    (`TORCHINDUCTOR_FX_GRAPH_CACHE=0` on a machine where one may be cached)."""
    torch.backends.mkldnn.enabled = False


def int8_quantized(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """torchao int8 (`INT8_SCHEMES`, per-channel weights) on every Linear except lm_head and the modules kept
    precise, in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    skipped = {*precise_module_names(), "lm_head"}

    def quantized(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skipped

    # set_inductor_config=False: torchao's recommended inductor settings turn on coordinate-descent tuning of every
    # kernel, and compiling the 13b decode graph with them ran past the 10-minute call limit on the H200.
    config_class = Int8WeightOnlyConfig if scheme == "int8" else Int8DynamicActivationInt8WeightConfig
    quantize_(model, config_class(set_inductor_config=False), filter_fn=quantized)
    return model


def greedy_config(new_tokens: int, cache_implementation: str | None = None, **options) -> GenerationConfig:
    """Greedy decoding of exactly `new_tokens` tokens (no end-of-sequence stop) with that cache; `options` add to it
    or replace its fields (sampling: `do_sample=True`)."""
    fields = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None,
              "pad_token_id": 0, "cache_implementation": cache_implementation}  # fmt: skip
    return GenerationConfig(**{**fields, **options})


def setting_config(
    setting: str, prompt: torch.Tensor, new_tokens: int, mode: str = "greedy", extra: dict | None = None
) -> GenerationConfig:
    """The generation config of `setting` decoding `new_tokens` tokens in `mode` (sampling or beams added), with the
    `extra` fields (`cache_config`: the arguments of the cache generate() builds; `prefill_chunk_size`) if any."""
    options = {**{"sample": SAMPLING, "beam": {"num_beams": NUM_BEAMS}}.get(mode, {}), **(extra or {})}
    if setting in ("default", "dynamic"):
        return greedy_config(new_tokens, None if setting == "default" else "dynamic", **options)
    compile_config = CompileConfig(mode="max-autotune" if setting == "static-autotune" else "reduce-overhead")
    max_cache_len = prompt.shape[1] + NEW_TOKENS
    return greedy_config(new_tokens, "static", max_cache_len=max_cache_len, compile_config=compile_config, **options)


class HostStreamer(BaseStreamer):
    """What a text streamer does to the decoding loop, without a tokenizer: each step's new tokens read on the
    host (`TextIteratorStreamer.put` calls `value.tolist()`, which waits for the device)."""

    def __init__(self) -> None:
        self.tokens = []

    def put(self, value: torch.Tensor) -> None:
        self.tokens.append(value.tolist())

    def end(self) -> None:
        self.tokens.clear()


def prompt_mask(prompt: torch.Tensor, mode: str) -> torch.Tensor:
    """The attention mask of `prompt` `[B, C]`: all ones, or with `left-padded` every row after the first padded
    on the left by a quarter of the context."""
    mask = torch.ones_like(prompt)
    if mode == "left-padded":
        mask[1:, : prompt.shape[1] // 4] = 0
    return mask


def generate_call(
    model, prompt: torch.Tensor, new_tokens: int, setting: str, mode: str = "greedy", extra: dict | None = None
):
    """A `generate()` call of `new_tokens` tokens in `setting` and `mode` (a static cache sized for NEW_TOKENS)."""
    config = setting_config(setting, prompt, new_tokens, mode, extra)
    attention_mask = prompt_mask(prompt, mode)
    streamer = HostStreamer() if mode == "stream" else None

    def call() -> None:
        # Transformers sizes a new StaticCache to the largest one the model had (to spare a recompile), so a shorter
        # shape after a longer one would time the longer cache; each shape gets its own size.
        model.__dict__.pop("_previous_max_cache_length", None)
        with torch.no_grad():
            model.generate(prompt, attention_mask=attention_mask, generation_config=config, streamer=streamer)

    return call


@dataclass
class DecodeTiming:
    ms_per_token: float
    peak_gib: float | None  # this model's weights plus what generate() allocated (GPU)
    first_call_s: float  # the first call of this setting at this shape: compilation included, if any


def decode_timing(
    model, prompt: torch.Tensor, setting: str, mode: str = "greedy", extra: dict | None = None
) -> DecodeTiming:
    """One setting at one shape: the first call (timed on its own, and the warm-up), then ms per token.

    Prints the figures as soon as they are known, so that a run cut short still reports its finished settings."""
    device = prompt.device
    options = (setting, mode, extra)
    first_call_s = first_call_seconds(generate_call(model, prompt, NEW_TOKENS, *options), device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    # The faster of two calls: a step's time is a difference of two calls, which noise would otherwise dominate.
    full = min(times_ms(generate_call(model, prompt, NEW_TOKENS, *options), device, repeats=2))
    baseline = min(times_ms(generate_call(model, prompt, BASELINE_TOKENS, *options), device, repeats=2))
    ms_per_token = (full - baseline) / (NEW_TOKENS - BASELINE_TOKENS)
    peak = (weight_bytes(model) + torch.cuda.max_memory_allocated() - resident) / 2**30 if on_gpu else None
    print(
        f"  {type(model).__name__} {setting} {prompt.shape[0]} x {prompt.shape[1]}: {ms_per_token:.2f} ms/token, "
        f"first call {first_call_s:.1f} s, first 2 tokens {baseline:.0f} ms"
        + ("" if peak is None else f", peak {peak:.1f} GiB"),
        flush=True,
    )
    return DecodeTiming(ms_per_token, peak, first_call_s)


def setting_timings(
    model, prompts: dict, setting: str, mode: str = "greedy", extra: dict | None = None
) -> tuple[dict, str]:
    """Every shape in one setting, compiled state kept from shape to shape (as in a user's process): each shape's
    `DecodeTiming` (None where it failed, reported), and a note of the graphs dynamo compiled over all shapes and,
    for the default setting, of its first call once more after `torch._dynamo.reset()` (inductor's on-disk cache
    then warm)."""
    torch._dynamo.reset()
    counters.clear()
    timings = {}
    for shape, prompt in prompts.items():
        try:
            timings[shape] = decode_timing(model, prompt, setting, mode, extra)
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            print(f"  {type(model).__name__} {setting} {shape}: failed: {type(error).__name__}: {str(error)[:200]}")
            timings[shape] = None
    graphs = counters["stats"]["unique_graphs"]
    note = f"{graphs} graphs compiled over {len(prompts)} shapes"
    if graphs and setting == "default":
        torch._dynamo.reset()
        shape, prompt = next(iter(prompts.items()))
        call = generate_call(model, prompt, NEW_TOKENS, setting, mode, extra)
        again_s = first_call_seconds(call, prompt.device)
        note += f", first call again with the compile cache warm {again_s:.1f} s ({shape[0]} x {shape[1]})"
    torch._dynamo.reset()
    return timings, note


def decode_table(
    models_by_name: dict,
    config,
    shapes: list[tuple[int, int]],
    bandwidth: float,
    settings,
    mode: str = "greedy",
    kv_cache: str = "model",
    prefill_chunk: int | None = None,
) -> list[str]:
    """One row per (batch, context): per model and setting, ms per token / tokens per second / first call's seconds
    (compilation included); the floors; FastGPT's default against the fastest Llama setting and against its floor.
    With `mode` beam, a step and its floor cover the batch's NUM_BEAMS beams each; tokens/s counts the batch's.
    `kv_cache` int8: FastGPT's cache int8 (`--kv-cache`), Llama's in the model's dtype; `prefill_chunk`: both
    models prefill in chunks of that many tokens (`--prefill-chunk`)."""
    device = next(iter(models_by_name.values())).device
    generator = torch.Generator().manual_seed(0)
    prompts = {
        (batch, context): torch.randint(0, config.vocab_size, (batch, context), generator=generator).to(device)
        for batch, context in shapes
    }
    kv_quantization = None if kv_cache == "model" else kv_cache
    timings, notes = {}, []
    for setting in settings:
        for name, model in models_by_name.items():
            extra = {} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}
            if kv_quantization and name.startswith("FastGPT"):
                extra["cache_config"] = {"kv_quantization": kv_quantization}
            timings[name, setting], note = setting_timings(model, prompts, setting, mode, extra)
            notes.append(f"- {name} {setting}: {note}")
            print(notes[-1], flush=True)
    columns = [(name, setting) for name in models_by_name for setting in settings]
    fastgpt = next(name for name in models_by_name if name.startswith("FastGPT"))
    llama = next(name for name in models_by_name if name.startswith("Llama"))
    cache_dtype = next(iter(models_by_name.values())).dtype
    header = " | ".join(f"{name} {setting}" for name, setting in columns)
    rows = [
        f"| batch x context | {header} | floor ms {llama} / {fastgpt} | {fastgpt} {settings[0]} vs fastest {llama} "
        f"| {fastgpt} {settings[0]} x floor |",
        "| --- |" + " ---: |" * (len(columns) + 3),
    ]
    for shape in shapes:
        batch, context = shape
        rows_read = batch * (NUM_BEAMS if mode == "beam" else 1)
        cells = []
        for column in columns:
            timing = timings[column][shape]
            if timing is None:
                cells.append("failed")
                continue
            tokens_per_second = batch * 1e3 / timing.ms_per_token
            peak = "" if timing.peak_gib is None else f" / {timing.peak_gib:.1f} GiB"
            cells.append(f"{timing.ms_per_token:.2f} / {tokens_per_second:,.0f} / {timing.first_call_s:.1f} s{peak}")
        held_cache_bytes = {
            llama: floors.llama_cache_bytes(config, context, cache_dtype),
            fastgpt: floors.fastgpt_cache_bytes(config, context, cache_dtype, kv_quantization),
        }
        floor = {
            name: floors.bytes_floor_ms(
                floors.decode_weight_bytes(models_by_name[name]) + rows_read * held_cache_bytes[name], bandwidth
            )
            for name in (llama, fastgpt)
        }
        ours = timings[fastgpt, settings[0]][shape]
        llama_times = [timings[llama, setting][shape] for setting in settings if timings[llama, setting][shape]]
        versus = floor_ratio = "-"
        if ours is not None and llama_times:
            versus = f"{min(timing.ms_per_token for timing in llama_times) / ours.ms_per_token:.2f}x"
        if ours is not None:
            floor_ratio = f"{ours.ms_per_token / floor[fastgpt]:.1f}x"
        rows.append(
            f"| {batch} x {context} | {' | '.join(cells)} | {floor[llama]:.2f} / {floor[fastgpt]:.2f} | {versus} "
            f"| {floor_ratio} |"
        )
    legend = (
        f"Cells: ms per token / tokens per second / first call's seconds (prefill, compilation if any and "
        f"{NEW_TOKENS} tokens) / on a GPU the peak GiB (weights and what generate() allocated), settings kept from "
        "shape to shape in the order of the rows."
    )
    if kv_quantization:
        legend += (
            f" FastGPT's cache holds {kv_quantization} keys and values (float32 scales); Llama's stays "
            f"{SHORT_DTYPE_NAMES[cache_dtype]}: Transformers' static cache has no {kv_quantization} form."
        )
    if prefill_chunk is not None:
        legend += f" Both models prefill in chunks of {prefill_chunk} tokens."
    rows = [f"Decoding: {mode}", "", *rows, "", legend, *notes]
    print("\n" + "\n".join(rows), flush=True)
    return rows


def generate_once(model, prompt: torch.Tensor, new_tokens: int, compile_mode: str, cache: str, steps: int) -> float:
    """One greedy generate() of `new_tokens` tokens; its wall seconds. A static cache is sized for a run's longest
    call (2 * `steps` + 1 new tokens), so every call of the run uses the same compiled graph."""
    sizing = {"max_cache_len": prompt.shape[1] + 2 * steps + 1} if cache == "static" else {}
    config = greedy_config(new_tokens, cache, compile_config=CompileConfig(mode=compile_mode), **sizing)

    def call() -> None:
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)

    return call_ms(call, prompt.device) / 1e3


def profile_generate(model, prompt: torch.Tensor, new_tokens: int, compile_mode: str, cache: str, steps: int):
    """Profile of one generate_once() after two unprofiled warm-up calls."""
    for _ in range(2):
        generate_once(model, prompt, new_tokens, compile_mode, cache, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.is_cuda else [])
    with profile(activities=activities) as profiler:
        generate_once(model, prompt, new_tokens, compile_mode, cache, steps)
    return profiler


def compile_summary(model, prompt: torch.Tensor, steps: int) -> list[str]:
    counters.clear()
    events = profile_generate(model, prompt, steps + 1, "reduce-overhead", "static", steps).key_averages()
    counts = {event.key: event.count for event in events}
    # The runtime's cudaLaunchKernel(ExC) and the driver's cuLaunchKernel(Ex), which triton uses.
    launches = sum(count for key, count in counts.items() if "LaunchKernel" in key)
    return [
        f"  compile: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph "
        f"breaks {dict(counters['graph_break'])}, {counters['inductor']['cudagraph_skips']} CUDA graph skips",
        f"  per decode step: {counts.get('cudaGraphLaunch', 0) / steps:.1f} graph launches, "
        f"{launches / steps:.1f} single kernel launches (the prefill's included)",
    ]


def step_times(model, prompt: torch.Tensor, steps: int, cache: str) -> tuple[Counter, float]:
    """Milliseconds per decode step of each kernel (each operator on a CPU), without CUDA graphs, and the wall
    milliseconds per step unprofiled; `cache` "static" (compiled by generate()) or "dynamic" (eager)."""
    on_gpu = prompt.is_cuda
    totals, walls = [], []
    for new_tokens in (steps + 1, 2 * steps + 1):
        times = Counter()
        for event in profile_generate(model, prompt, new_tokens, "default", cache, steps).key_averages():
            if on_gpu and event.device_type == DeviceType.CUDA:
                times[event.key] += event.self_device_time_total / 1000
            elif not on_gpu and event.key.startswith("aten::"):
                times[event.key] += event.self_cpu_time_total / 1000
        totals.append(times)
        walls.append(min(generate_once(model, prompt, new_tokens, "default", cache, steps) for _ in range(3)))
    per_step = Counter({key: (totals[1][key] - totals[0][key]) / steps for key in totals[1]})
    return per_step, (walls[1] - walls[0]) / steps * 1000


def kernel_table(times: Counter, wall_ms: float, rows: int) -> list[str]:
    lines = [
        f"  one decode step: {sum(times.values()):.3f} ms in {len(times)} distinct kernels, {wall_ms:.3f} ms of wall "
        "time; the most costly kernels:"
    ]
    for name, milliseconds in times.most_common(rows):
        lines.append(f"    {milliseconds:8.3f} ms  {name[:100]}")
    return lines


def profile_models(args: argparse.Namespace, pair: dict, shapes: list[tuple[int, int]]) -> None:
    torch._logging.set_logs(perf_hints=True)  # inductor logs why it skips CUDA graphs
    if args.weights[-1] != "bf16":
        pair = {name: int8_quantized(model, args.weights[-1]) for name, model in pair.items()}
    for batch, context in shapes:
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, pair["FastGPT"].config.vocab_size, (batch, context), generator=generator)
        prompt = prompt.to(pair["FastGPT"].device)
        print(f"{args.weights[-1]} weights, batch {batch} x context {context}, {args.cache} cache")
        for name, model in pair.items():
            print(f"{name}:")
            if args.cache == "static":
                print("\n".join(compile_summary(model, prompt, args.steps)))
                torch._dynamo.reset()
            print("\n".join(kernel_table(*step_times(model, prompt, args.steps, args.cache), args.rows)), flush=True)
            torch._dynamo.reset()


class OperatorCount(TorchDispatchMode):
    """Counts aten operators dispatched while active: views and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.views = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def step_cost(model, batch: int, context: int, steps: int) -> tuple[OperatorCount, float]:
    """Operators of one one-token forward after `context` tokens (fed PREFILL_CHUNK at a time through the model's
    default cache), and the median wall ms of `steps` such steps."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(model.device)
    cache = None
    with torch.no_grad():
        for chunk in prompt.split(PREFILL_CHUNK, dim=1):
            cache = model(chunk, cache=cache, use_cache=True).cache
        token = prompt[:, -1:]
        counter = OperatorCount()
        with counter:
            model(token, cache=cache, use_cache=True)
        milliseconds = median_ms(lambda: model(token, cache=cache, use_cache=True), model.device, steps, warmup=0)
    return counter, milliseconds


def operator_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, shapes) -> list[str]:
    """Per layer kind and shape: operators and median ms of one eager one-token step, both models."""
    kinds = [args.layer_kind] if args.layer_kind else list(LAYER_TYPES)
    print(f"device: {floors.device_name(device)}, torch {torch.__version__}; preset {args.preset}, {dtype}")
    rows = [
        "| layer kind | batch x context | FastGPT ops (views) | Llama ops (views) | ops ratio | FastGPT ms | Llama ms "
        "| FastGPT speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(rows), flush=True)
    for kind in kinds:
        args.layer_kind = kind
        pair = models.model_pair(models.fastgpt_config(args), device, dtype)
        for batch, context in shapes:
            (ours, ours_ms), (peer, peer_ms) = (
                step_cost(pair[name], batch, context, args.steps) for name in ("FastGPT", "Llama")
            )
            rows.append(
                f"| {kind} | {batch} x {context} | {ours.others} ({ours.views}) | {peer.others} ({peer.views}) "
                f"| {ours.others / peer.others:.2f} | {ours_ms:.2f} | {peer_ms:.2f} | {peer_ms / ours_ms:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows
