"""Prefill and training-step time of FastGPT against a LlamaForCausalLM of the same shape, side by side, on one GPU.

Both models get random bf16 weights of the chosen preset's shape, in the same process, one after the other.
- Prefill: `model(input_ids, logits_to_keep=1)` (what generate() does for a prompt) at each `--shapes` entry (`T` or
  `BxT`). Each model runs every attention backend of `--backends` in each setting: `eager`; `cuda graph` (the same
  eager kernels captured once into a CUDA graph and replayed, which removes Python's per-kernel launch cost, the
  bound below a few thousand tokens); with `--compile` also `compiled` (`torch.compile`, static shapes). The fastest
  setting is reported, and the eager figure beside it. At the longest shape one eager prefill of each model is
  profiled and its device time split by kernel kind (attention, matmul, other).
- Training (`--train BxT ...`): one forward and backward (bf16 weights and gradients, no optimizer) of the mean
  next-token cross-entropy, its logits computed a chunk of positions at a time (`chunked_cross_entropy`, the same
  for both models), eager and with `--compile` the decoder stack compiled; peak memory is this model's weights,
  gradients and activations.
- Floors: FLOPs / the measured bf16 matmul rate. Prefill: dense projections and MLP plus attention over the score
  entries FastGPT computes (`attention_sparsity`); training: three times that plus the output head.

    python benchmarks/bench_prefill.py --preset 1b --shapes 512 1024 2048 8192 32768 8x2048 --train 8x2048 1x32768
"""

import argparse
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.quantization import weight_bytes
from fastgpt_hf.training import llama_config

BACKENDS = ("sdpa", "flex_attention")
LOSS_CHUNK_TOKENS = 8192


def median_ms(function, repeats: int = 7) -> float:
    """Median CUDA-event time of `function()` after two warm-up calls."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_tflops() -> float:
    """Measured bf16 rate of an 8192^3 matrix product, TFLOP/s."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9


def parse_shape(text: str) -> tuple[int, int]:
    """`"2048"` -> (1, 2048); `"8x2048"` -> (8, 2048)."""
    batch, _, length = text.rpartition("x")
    return int(batch or 1), int(length)


def prefill_flops(model: FastGPTForCausalLM, length: int) -> float:
    """Dense projection and MLP FLOPs plus attention FLOPs over computed score entries (no lm_head), one row."""
    config = model.config
    dense_parameters = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    attention_entries = sum((1 - sparsity) * length**2 for sparsity in model.attention_sparsity(length))
    return 2 * dense_parameters * length + 4 * config.num_attention_heads * config.head_dim * attention_entries


def training_flops(model: FastGPTForCausalLM, batch: int, length: int) -> float:
    """Forward and backward: three times the prefill's FLOPs plus the output head's, every row."""
    head = 2 * model.config.vocab_size * model.config.hidden_size * length
    return 3 * batch * (prefill_flops(model, length) + head)


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


def best_prefill(model, input_ids, backends, settings) -> dict[tuple[str, str], tuple[float, float]]:
    """(median ms, peak GiB of this model's weights plus what its prefill allocates) per working (backend,
    setting); a failing one is reported and left out."""
    results = {}
    repeats = 15 if input_ids.numel() <= 16384 else 5
    for backend in backends:
        for setting in settings:
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    milliseconds = median_ms(prefill_runner(model, input_ids, backend, setting), repeats)
            except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
                print(f"  {type(model).__name__} {backend} {setting}: failed: {type(error).__name__}: {error}"[:300])
                continue
            finally:
                torch.cuda.empty_cache()
            peak = weight_bytes(model) + torch.cuda.max_memory_allocated() - resident
            results[backend, setting] = (milliseconds, peak / 2**30)
    model.set_attn_implementation("sdpa")
    return results


def label(setting: tuple[str, str]) -> str:
    return f"{setting[0]}, {setting[1]}"


def fastest(results: dict) -> tuple[tuple[str, str], float, float]:
    setting = min(results, key=lambda key: results[key][0])
    return setting, *results[setting]


def eager_ms(results: dict) -> str:
    """The fastest eager backend's ms, or '-'."""
    eager = [ms for (_, setting), (ms, _) in results.items() if setting == "eager"]
    return f"{min(eager):.1f}" if eager else "-"


def prefill_table(fastgpt, llama, shapes, peak: float, backends, settings) -> list[str]:
    """Both models' fastest prefill per shape, the FLOP floor, then where the time goes at the last shape."""
    rows = [
        "| batch x tokens | Llama ms (setting) | FastGPT ms (setting) | FastGPT speed-up | floor ms "
        "| eager ms Llama / FastGPT | peak GiB Llama / FastGPT |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = {}
    for batch, length in shapes:
        # Drawn on the CPU: a failed CUDA-graph capture above leaves the CUDA generator unusable.
        input_ids = torch.randint(0, fastgpt.config.vocab_size, (batch, length)).cuda()
        llama_results = best_prefill(llama, input_ids, backends, settings)
        ours_results = best_prefill(fastgpt, input_ids, backends, settings)
        if not llama_results or not ours_results:
            rows.append(f"| {batch} x {length} | every setting of a model failed (above) | | | | | |")
            print(rows[-1], flush=True)
            continue
        best["Llama"], llama_ms, llama_gib = fastest(llama_results)
        best["FastGPT"], ours_ms, our_gib = fastest(ours_results)
        floor_ms = batch * prefill_flops(fastgpt, length) / (peak * 1e12) * 1e3
        rows.append(
            f"| {batch} x {length} | {llama_ms:.1f} ({label(best['Llama'])}) "
            f"| {ours_ms:.1f} ({label(best['FastGPT'])}) "
            f"| {llama_ms / ours_ms:.2f}x | {floor_ms:.1f} | {eager_ms(llama_results)} / {eager_ms(ours_results)} "
            f"| {llama_gib:.1f} / {our_gib:.1f} |"
        )
        print(rows[-1], flush=True)
    rows += [
        "",
        f"Device time of one eager {batch} x {length} prefill by kernel kind, each model's fastest backend:",
        "",
    ]
    rows += [
        "| model (backend) | attention ms | matmul ms | other ms | all kernels ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, model in (("Llama", llama), ("FastGPT", fastgpt)):
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


def training_runner(model, input_ids: torch.Tensor, compiled: bool) -> Callable[[], None]:
    """One forward and backward of the next-token loss on `input_ids` (gradients accumulate in `.grad`)."""
    torch._dynamo.reset()
    decoder = torch.compile(model.model, dynamic=False) if compiled else model.model
    labels = input_ids.roll(-1, dims=1)

    def step():
        hidden = decoder(input_ids, use_cache=False).last_hidden_state
        chunked_cross_entropy(model.lm_head, hidden, labels).backward()

    return step


def best_training(model, input_ids, settings) -> dict[str, tuple[float, float]]:
    """(median ms, peak GiB of weights + gradients + activations) per working setting (eager, compiled)."""
    results = {}
    model.train()
    for setting in [setting for setting in settings if setting != "cuda graph"]:
        model.zero_grad(set_to_none=True)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            milliseconds = median_ms(training_runner(model, input_ids, setting == "compiled"), 5)
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            print(f"  {type(model).__name__} train {setting}: failed: {type(error).__name__}: {error}"[:300])
            continue
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        peak = weight_bytes(model) + torch.cuda.max_memory_allocated() - resident
        results[setting] = (milliseconds, peak / 2**30)
    model.eval()
    return results


def training_table(fastgpt, llama, shapes, peak: float, settings) -> list[str]:
    """Both models' fastest training step per shape, sdpa, with the FLOP floor and peak memory."""
    rows = [
        "| batch x tokens | Llama ms (setting) | FastGPT ms (setting) | FastGPT speed-up | floor ms "
        "| peak GiB Llama / FastGPT |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, length in shapes:
        # Drawn on the CPU: a failed CUDA-graph capture above leaves the CUDA generator unusable.
        input_ids = torch.randint(0, fastgpt.config.vocab_size, (batch, length)).cuda()
        llama_results, ours_results = (
            best_training(llama, input_ids, settings),
            best_training(fastgpt, input_ids, settings),
        )
        if not llama_results or not ours_results:
            rows.append(f"| {batch} x {length} | every setting of a model failed (above) | | | | |")
            print(rows[-1], flush=True)
            continue
        (llama_setting, (llama_ms, llama_gib)), (our_setting, (ours_ms, our_gib)) = (
            min(results.items(), key=lambda item: item[1][0]) for results in (llama_results, ours_results)
        )
        floor_ms = training_flops(fastgpt, batch, length) / (peak * 1e12) * 1e3
        rows.append(
            f"| {batch} x {length} | {llama_ms:.1f} ({llama_setting}) | {ours_ms:.1f} ({our_setting}) "
            f"| {llama_ms / ours_ms:.2f}x | {floor_ms:.1f} | {llama_gib:.1f} / {our_gib:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--shapes", nargs="*", default=["2048", "8192", "32768"], help="prefill shapes, T or BxT")
    parser.add_argument("--train", nargs="*", default=[], help="training-step shapes, BxT")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(args.preset)
    peak = matmul_tflops()
    torch.set_default_dtype(torch.bfloat16)  # random init straight on the GPU in bf16: seconds, even at 13b
    with torch.device("cuda"):
        fastgpt = FastGPTForCausalLM(config).eval()
        llama = LlamaForCausalLM(llama_config(config)).eval()
    torch.set_default_dtype(torch.float32)
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 matmul {peak:.0f} TFLOP/s; "
        f"preset {args.preset}",
        flush=True,
    )
    settings = ["eager", "cuda graph", *(["compiled"] if args.compile else [])]
    if args.shapes:
        prefill_table(fastgpt, llama, [parse_shape(shape) for shape in args.shapes], peak, args.backends, settings)
    if args.train:
        print("\nTraining step (forward + backward, sdpa):", flush=True)
        llama.set_attn_implementation("sdpa")
        training_table(fastgpt, llama, [parse_shape(shape) for shape in args.train], peak, settings)


if __name__ == "__main__":
    main()
