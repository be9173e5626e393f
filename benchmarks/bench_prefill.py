"""Prefill time of FastGPT against a LlamaForCausalLM of the same shape, side by side, on one CUDA device.

Both models get random bf16 weights of the chosen preset's shape and run `model(input_ids, logits_to_keep=1)` (what
generate() does for a prompt). Each model runs with every attention backend it supports, with `--compile` also
under `torch.compile` (static shapes), and its fastest setting is reported. At the longest length, one prefill of
each model in its fastest setting is profiled and its device time split by kernel kind (attention, matmul, other:
norms, rotary, activations, copies), which says where the time goes. The floor is FLOPs over the measured bf16
matmul rate: dense projections and MLP, plus attention over the score entries each layer actually computes (from
`attention_sparsity`).

    python benchmarks/bench_prefill.py --preset 1b --lengths 2048 8192 32768 --compile
"""

import argparse
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.quantization import weight_bytes
from fastgpt_hf.training import llama_config

BACKENDS = ("sdpa", "flex_attention")


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


def prefill_flops(model: FastGPTForCausalLM, length: int) -> float:
    """Dense projection and MLP FLOPs plus attention FLOPs over computed score entries (no lm_head)."""
    config = model.config
    dense_parameters = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
    attention_entries = sum((1 - sparsity) * length**2 for sparsity in model.attention_sparsity(length))
    return 2 * dense_parameters * length + 4 * config.num_attention_heads * config.head_dim * attention_entries


def prefill_forward(model, backend: str, compiled: bool):
    """`model` set to `backend`, compiled (static shapes, fresh dynamo caches) or not: a forward to call."""
    model.set_attn_implementation(backend)
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False) if compiled else model


def setting_label(setting: tuple[str, bool]) -> str:
    backend, compiled = setting
    return f"{backend}, compiled" if compiled else backend


def best_prefill(model, input_ids, compile_too: bool = False) -> tuple[float, tuple[str, bool], float] | None:
    """(fastest median ms, its (backend, compiled) setting, peak GiB of this model's weights plus what its prefill
    allocates) over BACKENDS, each eager and, with `compile_too`, compiled; None when every setting failed."""
    results = []
    compile_modes = (False, True) if compile_too else (False,)
    for setting in [(backend, compiled) for backend in BACKENDS for compiled in compile_modes]:
        forward = prefill_forward(model, *setting)
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                milliseconds = median_ms(lambda forward=forward: forward(input_ids, logits_to_keep=1, use_cache=False))
        except Exception as error:  # noqa: BLE001  (a benchmark reports a broken setting and goes on)
            failure = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"  {type(model).__name__} {setting_label(setting)}: failed: {failure}", flush=True)
            continue
        peak = weight_bytes(model) + torch.cuda.max_memory_allocated() - resident
        results.append((milliseconds, setting, peak / 2**30))
    return min(results) if results else None


def kernel_kind(name: str) -> str:
    """attention, matmul or other, from a CUDA kernel's name (cuDNN / flash / efficient / flex attention kernels;
    cuBLAS, nvjet and CUTLASS matmuls)."""
    lowered = name.lower()
    if any(word in lowered for word in ("attention", "fmha", "flash", "sdpa", "flex")):
        return "attention"
    if any(word in lowered for word in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "matmul"
    return "other"


def time_by_kernel_kind(model, input_ids, setting: tuple[str, bool]) -> Counter:
    """Device ms of one prefill in `setting` (backend, compiled), summed by `kernel_kind`."""
    forward = prefill_forward(model, *setting)
    with torch.no_grad():
        for _ in range(2):
            forward(input_ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            forward(input_ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
    times = Counter()
    for event in profiler.key_averages():
        if event.device_type == DeviceType.CUDA:
            times[kernel_kind(event.key)] += event.self_device_time_total / 1000
    return times


def prefill_table(fastgpt, llama, lengths: list[int], peak: float, compile_too: bool) -> list[str]:
    """Both models' fastest prefill per length, the FLOP floor, then where the time goes at the longest length."""
    rows = ["| tokens | Llama ms (setting) | FastGPT ms (setting) | speed-up | floor ms | peak GiB Llama/FastGPT |"]
    rows.append("| ---: | ---: | ---: | ---: | ---: | ---: |")
    settings = {}
    for length in lengths:
        input_ids = torch.randint(0, fastgpt.config.vocab_size, (1, length), device="cuda")
        llama_best, ours_best = (
            best_prefill(llama, input_ids, compile_too),
            best_prefill(fastgpt, input_ids, compile_too),
        )
        if llama_best is None or ours_best is None:
            rows.append(f"| {length} | every setting of a model failed (above) | | | | |")
            print(rows[-1], flush=True)
            continue
        (llama_ms, settings["Llama"], llama_gib), (ours_ms, settings["FastGPT"], our_gib) = llama_best, ours_best
        floor_ms = prefill_flops(fastgpt, length) / (peak * 1e12) * 1e3
        rows.append(
            f"| {length} | {llama_ms:.1f} ({setting_label(settings['Llama'])}) | "
            f"{ours_ms:.1f} ({setting_label(settings['FastGPT'])}) | "
            f"{llama_ms / ours_ms:.2f}x | {floor_ms:.1f} | {llama_gib:.1f} / {our_gib:.1f} |"
        )
        print(rows[-1], flush=True)
    rows += ["", f"Device time of one {length}-token prefill by kernel kind, each model in its fastest setting:", ""]
    rows.append("| model (setting) | attention ms | matmul ms | other ms | all kernels ms |")
    rows.append("| --- | ---: | ---: | ---: | ---: |")
    for name, model in (("Llama", llama), ("FastGPT", fastgpt)):
        if name not in settings:
            continue
        times = time_by_kernel_kind(model, input_ids, settings[name])
        rows.append(
            f"| {name} ({setting_label(settings[name])}) | {times['attention']:.1f} | {times['matmul']:.1f} | "
            f"{times['other']:.1f} | {sum(times.values()):.1f} |"
        )
        print(rows[-1], flush=True)
        model.set_attn_implementation("sdpa")
    torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--compile", action="store_true", help="also time each backend under torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(args.preset)
    peak = matmul_tflops()
    torch.set_default_dtype(torch.bfloat16)  # random init straight on the GPU in bf16: seconds, even at 13b
    with torch.device("cuda"):
        fastgpt = FastGPTForCausalLM(config).eval()
        llama = LlamaForCausalLM(llama_config(config)).eval()
    torch.set_default_dtype(torch.float32)
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul {peak:.0f} TFLOP/s; preset {args.preset}")
    prefill_table(fastgpt, llama, args.lengths, peak, args.compile)


if __name__ == "__main__":
    main()
