"""Prefill and training-step time of FastGPT against a LlamaForCausalLM of the same shape, side by side.

Both models get random weights of the preset's shape (bf16 on a GPU, float32 on a CPU), in the same process.
- Prefill: `model(input_ids, logits_to_keep=1, use_cache=False)` (what generate() does for a prompt) at each
  `--shapes` entry (`T` or `BxT`). Each model runs every attention backend of `--backends` in each setting: `eager`;
  on a GPU `cuda graph` (the same eager kernels captured once into a CUDA graph and replayed, which removes Python's
  per-kernel launch cost, the bound below a few thousand tokens); with `--compile` also `compiled` (`torch.compile`,
  static shapes). The fastest setting is reported, and the eager figure beside it. On a GPU, at the last shape one
  eager prefill of each model is profiled and its device time split by kernel kind (attention, matmul, other).
- Training (`--train BxT ...`): one forward and backward (no optimizer) of the mean next-token cross-entropy, its
  logits computed a chunk of positions at a time (the same for both models), with each backend of
  `--train-backends`, eager and with `--compile` the decoder stack compiled (`--gradient-checkpointing`: both models
  recompute each layer in backward); peak memory (GPU) is this model's
  weights, gradients and activations. With `--liger` the training table runs once more with both models patched
  in place by Liger-Kernel as `Trainer(use_liger_kernel=True)` patches them (`_apply_liger_kernel_to_instance`:
  Llama's own patch, FastGPT's `fastgpt_hf.liger`), the loss from the forward with labels (Liger's fused linear
  cross-entropy); last, because the patches stay.
- Caches (`--caches none dynamic static`): one eager forward over each shape (batch 1 rows, no padding) with no
  cache, with each model's dynamic cache and with its static cache (`cache_implementation="static"`'s, sized for the
  prompt plus 64 tokens), with the first backend of `--backends`. A prefill into an empty cache should cost what the
  pass without a cache costs: the static cache's empty slots are not attention work.
- Floors: FLOPs / the measured matmul rate (`floors.py`). Times: `timing.py`'s median after two warm-up calls.

    python benchmarks/bench.py prefill --preset 1b --shapes 512 1024 2048 8x2048 8192 32768 --train 8x2048 1x32768
    python benchmarks/bench.py prefill --preset 1b --shapes --train 8x2048 1x32768 --liger
    python benchmarks/bench.py prefill --preset 1b --shapes --train 1x32768 --gradient-checkpointing
    python benchmarks/bench.py prefill --device cpu --preset small --shapes 4096 --caches none dynamic static
"""

import argparse
from collections import Counter
from collections.abc import Callable

import floors
import models
import torch
import torch.nn.functional as F
from timing import median_ms
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, StaticCache

from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache
from fastgpt_hf.quantization import weight_bytes

BACKENDS = ("sdpa", "flex_attention", "eager")
CACHES = ("none", "dynamic", "static")
LOSS_CHUNK_TOKENS = 8192
STATIC_CACHE_ROOM = 64  # new tokens a static cache is sized for beyond the prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_model_arguments(parser, preset="1b")
    parser.add_argument("--shapes", nargs="*", default=["2048", "8192", "32768"], help="prefill shapes, T or BxT")
    parser.add_argument("--train", nargs="*", default=[], help="training-step shapes, BxT")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "flex_attention"], choices=BACKENDS)
    parser.add_argument("--train-backends", nargs="+", default=["sdpa"], choices=BACKENDS)
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument(
        "--liger", action="store_true", help="also time the training steps with Liger-Kernel (pip install liger-kernel)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="training steps recompute each decoder layer in backward (both models; what 1 x 32K of 1b needs on 80 GB)",
    )
    parser.add_argument("--caches", nargs="*", default=[], choices=CACHES, help="also prefill through these caches")
    parser.add_argument("--repeats", type=int, help="timed calls per figure (default 15, 5 past 16K tokens)")


def run(args: argparse.Namespace) -> None:
    device, dtype = models.device_and_dtype(args)
    config = models.fastgpt_config(args)
    header, _, rate = floors.device_header(device, dtype)
    print(f"{header}; preset {args.preset}, layers {config.layer_types}", flush=True)
    pair = models.model_pair(config, device, dtype)
    shapes = [models.parse_shape(shape) for shape in args.shapes]
    settings = ["eager", *(["cuda graph"] if device.type == "cuda" else []), *(["compiled"] if args.compile else [])]
    if device.type != "cuda":
        print("(the cuda graph setting and the split by kernel kind need a GPU: not run on the CPU)")
    if shapes:
        prefill_table(pair, shapes, rate, args.backends, settings, args.repeats)
    if args.train:
        recompute = args.gradient_checkpointing
        if recompute:
            for model in pair.values():
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        print(f"\nTraining step (forward + backward{', layers recomputed in backward' if recompute else ''}):",
              flush=True)  # fmt: skip
        train_settings = [setting for setting in settings if setting != "cuda graph"]
        train_shapes = [models.parse_shape(shape) for shape in args.train]
        training_table(pair, train_shapes, rate, args.train_backends, train_settings, recompute)
    if args.caches:
        print(f"\nPrefill through each cache ({args.backends[0]}, eager):", flush=True)
        cache_table(pair, [length for _, length in shapes], args.caches, args.backends[0], args.repeats)
    if args.liger and args.train:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        for model in pair.values():
            _apply_liger_kernel_to_instance(model=model)
        print("\nTraining step with Liger-Kernel's kernels (forward with labels + backward):", flush=True)
        training_table(pair, train_shapes, rate, args.train_backends, ["liger"], recompute)


def random_ids(vocab_size: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU: a failed CUDA-graph capture leaves the CUDA generator unusable.
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


def default_repeats(input_ids: torch.Tensor) -> int:
    return 15 if input_ids.numel() <= 16384 else 5


def cuda_graph_replay(function: Callable[[], object]) -> Callable[[], None]:
    """`function` (fixed inputs) run twice on a side stream, captured once into a CUDA graph: its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph.replay


def prefill_runner(model, input_ids: torch.Tensor, backend: str, setting: str) -> Callable[[], object]:
    """One prefill of `input_ids` by `model` with `backend`, in `setting` (eager, cuda graph, compiled)."""
    model.set_attn_implementation(backend)
    torch._dynamo.reset()
    forward = torch.compile(model, dynamic=False) if setting == "compiled" else model

    def prefill():
        return forward(input_ids, logits_to_keep=1, use_cache=False)

    return cuda_graph_replay(prefill) if setting == "cuda graph" else prefill


class PeakMemory:
    """GiB of a model's weights plus what the block allocates on a GPU at most; None on a CPU."""

    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device, self.gib = model, device, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            self.resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exception) -> None:
        if self.device.type == "cuda":
            peak = weight_bytes(self.model) + torch.cuda.max_memory_allocated() - self.resident
            self.gib = peak / 2**30
            torch.cuda.empty_cache()


def best_prefill(model, input_ids, backends, settings, repeats) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(median ms, peak GiB or None) per working (backend, setting); a failing one is reported and left out."""
    results = {}
    for backend in backends:
        for setting in settings:
            try:
                with PeakMemory(model, input_ids.device) as peak, torch.no_grad():
                    runner = prefill_runner(model, input_ids, backend, setting)
                    milliseconds = median_ms(runner, input_ids.device, repeats or default_repeats(input_ids))
            except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
                print(f"  {type(model).__name__} {backend} {setting}: failed: {type(error).__name__}: {error}"[:300])
                continue
            results[backend, setting] = (milliseconds, peak.gib)
    model.set_attn_implementation("sdpa")
    return results


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def eager_ms(results: dict) -> str:
    """The fastest eager backend's ms, or '-'."""
    eager = [ms for (_, setting), (ms, _) in results.items() if setting == "eager"]
    return f"{min(eager):.1f}" if eager else "-"


def prefill_table(pair: dict, shapes, rate: float, backends, settings, repeats) -> list[str]:
    """Both models' fastest prefill per shape, the FLOP floor, then (GPU) where the time goes at the last shape."""
    fastgpt = pair["FastGPT"]
    device = fastgpt.device
    rows = [
        "| batch x tokens | Llama ms (setting) | FastGPT ms (setting) | FastGPT speed-up | floor ms "
        "| eager ms Llama / FastGPT | peak GiB Llama / FastGPT |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(rows), flush=True)
    best = {}
    for batch, length in shapes:
        input_ids = random_ids(fastgpt.config.vocab_size, batch, length, device)
        results = {name: best_prefill(model, input_ids, backends, settings, repeats) for name, model in pair.items()}
        if not all(results.values()):
            rows.append(f"| {batch} x {length} | every setting of a model failed (above) | | | | | |")
            print(rows[-1], flush=True)
            continue
        fastest = {}
        for name, by_setting in results.items():
            best[name] = min(by_setting, key=lambda key: by_setting[key][0])
            fastest[name] = by_setting[best[name]]
        floor_ms = floors.compute_floor_ms(batch * floors.prefill_flops(fastgpt, length), rate)
        (llama_ms, llama_gib), (ours_ms, our_gib) = fastest["Llama"], fastest["FastGPT"]
        rows.append(
            f"| {batch} x {length} | {llama_ms:.1f} ({', '.join(best['Llama'])}) "
            f"| {ours_ms:.1f} ({', '.join(best['FastGPT'])}) | {llama_ms / ours_ms:.2f}x | {floor_ms:.1f} "
            f"| {eager_ms(results['Llama'])} / {eager_ms(results['FastGPT'])} | {gib(llama_gib)} / {gib(our_gib)} |"
        )
        print(rows[-1], flush=True)
    if device.type == "cuda" and best:
        rows += kernel_kind_table(pair, best, input_ids)
    return rows


def kernel_kind_table(pair: dict, best: dict, input_ids: torch.Tensor) -> list[str]:
    batch, length = input_ids.shape
    rows = [
        "",
        f"Device time of one eager {batch} x {length} prefill by kernel kind, each model's fastest backend:",
        "",
        "| model (backend) | attention ms | matmul ms | other ms | all kernels ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(rows), flush=True)
    for name, model in pair.items():
        if name in best:
            backend = best[name][0]
            times = time_by_kernel_kind(prefill_runner(model, input_ids, backend, "eager"))
            rows.append(
                f"| {name} ({backend}) | {times['attention']:.1f} | {times['matmul']:.1f} | {times['other']:.1f} "
                f"| {sum(times.values()):.1f} |"
            )
            print(rows[-1], flush=True)
            model.set_attn_implementation("sdpa")
    return rows


def kernel_kind(name: str) -> str:
    """attention, matmul or other, from a CUDA kernel's name (cuDNN / flash / efficient / flex attention kernels;
    cuBLAS, nvjet and CUTLASS matmuls)."""
    lowered = name.lower()
    if any(word in lowered for word in ("attention", "fmha", "flash", "sdpa", "flex")):
        return "attention"
    if any(word in lowered for word in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "matmul"
    return "other"


def time_by_kernel_kind(prefill: Callable[[], object]) -> Counter:
    """Device ms of one `prefill()`, summed by `kernel_kind`."""
    with torch.no_grad():
        for _ in range(2):
            prefill()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            prefill()
            torch.cuda.synchronize()
    times = Counter()
    for event in profiler.key_averages():
        if event.device_type == DeviceType.CUDA:
            times[kernel_kind(event.key)] += event.self_device_time_total / 1000
    return times


def chunk_cross_entropy(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk of positions `[B, t, hidden]`, logits in float32."""
    return F.cross_entropy(lm_head(hidden).float().flatten(0, 1), labels.flatten(), reduction="sum")


def chunked_cross_entropy(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `[B, T, hidden]` states against `[B, T]` labels, with the logits of at most
    LOSS_CHUNK_TOKENS positions alive at once (recomputed in backward): a 32K-token step of a 128K vocabulary would
    otherwise hold some 50 GB of float32 logits and their gradient."""
    batch, length, _ = hidden.shape
    step = max(1, LOSS_CHUNK_TOKENS // batch)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, length, step):
        chunk = slice(start, start + step)
        total = total + checkpoint(
            chunk_cross_entropy, lm_head, hidden[:, chunk], labels[:, chunk], use_reentrant=False
        )
    return total / labels.numel()


def training_runner(model, input_ids: torch.Tensor, setting: str) -> Callable[[], None]:
    """One forward and backward of the next-token loss on `input_ids` (gradients accumulate in `.grad`): the
    chunked loss over the decoder's states (`eager`, `compiled`: the decoder stack compiled), or for `liger` (a
    model Liger patched) the model's own forward with labels, whose loss is Liger's fused linear cross-entropy."""
    torch._dynamo.reset()
    if setting == "liger":
        return lambda: model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    decoder = torch.compile(model.model, dynamic=False) if setting == "compiled" else model.model
    labels = input_ids.roll(-1, dims=1)

    def step():
        hidden = decoder(input_ids, use_cache=False).last_hidden_state
        chunked_cross_entropy(model.lm_head, hidden, labels).backward()

    return step


def best_training(model, input_ids, backend: str, settings) -> dict[str, tuple[float, float | None]]:
    """(median ms, peak GiB of weights + gradients + activations or None) per working setting (eager, compiled,
    liger)."""
    results = {}
    model.train()
    model.set_attn_implementation(backend)
    for setting in settings:
        model.zero_grad(set_to_none=True)
        try:
            with PeakMemory(model, input_ids.device) as peak:
                runner = training_runner(model, input_ids, setting)
                milliseconds = median_ms(runner, input_ids.device, repeats=5)
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            print(f"  {type(model).__name__} train {backend} {setting}: failed: {type(error).__name__}: {error}"[:300])
            continue
        finally:
            model.zero_grad(set_to_none=True)
        results[setting] = (milliseconds, peak.gib)
    model.set_attn_implementation("sdpa")
    model.eval()
    return results


def training_table(pair: dict, shapes, rate: float, backends, settings, recompute: bool = False) -> list[str]:
    """Both models' fastest training step per shape and backend, with the FLOP floor (with `recompute`, gradient
    checkpointing, the layers' second forward counted) and peak memory."""
    fastgpt = pair["FastGPT"]
    rows = [
        "| batch x tokens | backend | Llama ms (setting) | FastGPT ms (setting) | FastGPT speed-up | floor ms "
        "| peak GiB Llama / FastGPT |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(rows), flush=True)
    for batch, length in shapes:
        input_ids = random_ids(fastgpt.config.vocab_size, batch, length, fastgpt.device)
        for backend in backends:
            results = {name: best_training(model, input_ids, backend, settings) for name, model in pair.items()}
            if not all(results.values()):
                rows.append(f"| {batch} x {length} | {backend} | every setting of a model failed (above) | | | | |")
                print(rows[-1], flush=True)
                continue
            (llama_setting, (llama_ms, llama_gib)), (our_setting, (ours_ms, our_gib)) = (
                min(by_setting.items(), key=lambda item: item[1][0]) for by_setting in results.values()
            )
            flops = floors.training_flops(fastgpt, batch, length, recompute_layers=recompute)
            floor_ms = floors.compute_floor_ms(flops, rate)
            rows.append(
                f"| {batch} x {length} | {backend} | {llama_ms:.1f} ({llama_setting}) | {ours_ms:.1f} ({our_setting}) "
                f"| {llama_ms / ours_ms:.2f}x | {floor_ms:.1f} | {gib(llama_gib)} / {gib(our_gib)} |"
            )
            print(rows[-1], flush=True)
    return rows


def new_cache(name: str, model, kind: str, max_cache_len: int):
    """An empty cache of `kind` for `model` ("none": None)."""
    if kind == "none":
        return None
    if name == "FastGPT":
        return (
            FastGPTDynamicCache(model.config) if kind == "dynamic" else FastGPTStaticCache(model.config, max_cache_len)
        )
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def cache_prefill(name: str, model, prompt: torch.Tensor, kind: str) -> Callable[[], None]:
    """One forward of `prompt` `[1, T]` into a new empty cache of `kind` (sized for T + STATIC_CACHE_ROOM)."""
    max_cache_len = prompt.shape[1] + STATIC_CACHE_ROOM

    def prefill() -> None:
        cache = new_cache(name, model, kind, max_cache_len)
        with torch.no_grad():
            model(prompt, attention_mask=torch.ones_like(prompt), cache=cache, use_cache=cache is not None)

    return prefill


def cache_table(pair: dict, lengths: list[int], caches, backend: str, repeats) -> list[str]:
    """Median ms of one batch-1 forward over each length into each kind of empty cache, both models."""
    rows = ["| tokens | cache | Llama ms | FastGPT ms | FastGPT speed-up |", "| ---: | --- | ---: | ---: | ---: |"]
    print("\n".join(rows), flush=True)
    for length in lengths:
        prompt = random_ids(pair["FastGPT"].config.vocab_size, 1, length, pair["FastGPT"].device)
        for kind in caches:
            milliseconds = {}
            for name, model in pair.items():
                model.set_attn_implementation(backend)
                milliseconds[name] = median_ms(cache_prefill(name, model, prompt, kind), prompt.device, repeats or 3, 1)
                model.set_attn_implementation("sdpa")
            llama, ours = milliseconds["Llama"], milliseconds["FastGPT"]
            rows.append(f"| {length} | {kind} | {llama:.1f} | {ours:.1f} | {llama / ours:.2f}x |")
            print(rows[-1], flush=True)
    return rows
