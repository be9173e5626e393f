"""Where a compiled static-cache decode step spends its time: FastGPT and its Llama peer, profiled side by side.

`bench_gpu.py` gives the ms per token; this says why. Both models generate with `cache_implementation="static"`.
First with generate()'s own compile (CUDA graphs on a GPU): the compiled graphs, graph breaks and CUDA graph skips
(dynamo's and inductor's counters; the reason of a skip is logged) and, per decode step, the CUDA graph launches
and single kernel launches (a step replayed as one CUDA graph has one graph launch). Then the kernels of one decode
step: CUDA graph replays hide their kernels from the profiler, so this part compiles without CUDA graphs (same
kernels) and profiles two generate() calls, `--steps` and twice that many tokens; the difference, over `--steps`,
is one decode step with the prefill cancelled out. `--layer-kind` builds every layer of one kind, to tell which
kind costs what; `--cache dynamic` profiles generate()'s default instead (dynamic cache, eager: no compile part, and
the wall time per step beside the kernel time says how much of it the host spends launching).

    python benchmarks/profile_decode.py --preset 13b --layers 6 --batch 32 --context 1024
    python benchmarks/profile_decode.py --preset 13b --layers 4 --layer-kind dynamic_attention
    python benchmarks/profile_decode.py --preset 13b --layers 4 --batch 16 --weights int8
    python benchmarks/profile_decode.py --preset tiny --device cpu --batch 2 --context 64   # smoke test
"""

import argparse
import time
from collections import Counter

import torch
from bench_gpu import greedy_config, int8_weight_only, keep_inductor_from_int8pack_mm
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.configuration_fastgpt import LAYER_TYPES
from fastgpt_hf.training import llama_config


def generate_once(model, prompt: torch.Tensor, new_tokens: int, compile_mode: str, cache: str, steps: int) -> float:
    """One greedy generate() of `new_tokens` tokens; its wall seconds. A static cache is sized for a run's longest
    call (2 * `steps` + 1 new tokens), so every call of the run uses the same compiled graph."""
    sizing = {"max_cache_len": prompt.shape[1] + 2 * steps + 1} if cache == "static" else {}
    config = greedy_config(new_tokens, cache, compile_config=CompileConfig(mode=compile_mode), **sizing)
    synchronize = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    synchronize()
    return time.perf_counter() - start


def profile_generate(
    model, prompt: torch.Tensor, new_tokens: int, compile_mode: str, cache: str, steps: int
) -> profile:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--layers", type=int, help="fewer layers than the preset (the default layer layout of that)")
    parser.add_argument("--layer-kind", choices=LAYER_TYPES, help="every layer of this kind")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument(
        "--cache", choices=("static", "dynamic"), default="static", help="dynamic: generate()'s default, eager"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--weights", choices=("bf16", "int8"), default="bf16", help="int8: bench_gpu.py's torchao weight-only layers"
    )
    args = parser.parse_args()
    if args.device == "cuda":
        keep_inductor_from_int8pack_mm()
    torch._logging.set_logs(perf_hints=True)  # inductor logs why it skips CUDA graphs
    torch.manual_seed(0)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = FastGPTConfig.from_preset(args.preset, **overrides)
    if args.layer_kind is not None:
        config = FastGPTConfig.from_preset(
            args.preset, **overrides, layer_types=[args.layer_kind] * config.num_hidden_layers
        )
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        models = {"Llama": LlamaForCausalLM(llama_config(config)).eval(), "FastGPT": FastGPTForCausalLM(config).eval()}
    torch.set_default_dtype(torch.float32)
    if args.weights == "int8":
        models = {name: int8_weight_only(model) for name, model in models.items()}
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device=args.device)
    print(
        f"preset {args.preset}, layers {config.layer_types}, {args.weights} weights, "
        f"batch {args.batch} x context {args.context}"
    )
    for name, model in models.items():
        print(f"{name}:")
        if args.cache == "static":
            print("\n".join(compile_summary(model, prompt, args.steps)))
            torch._dynamo.reset()
        print("\n".join(kernel_table(*step_times(model, prompt, args.steps, args.cache), args.rows)))
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
