"""Where a compiled static-cache decode step spends its time: FastGPT and its Llama peer, profiled side by side.

`bench_gpu.py` gives the ms per token; this says why. Both models generate with `cache_implementation="static"`.
First with generate()'s own compile (CUDA graphs on a GPU): the compiled graphs, graph breaks and CUDA graph skips
(dynamo's and inductor's counters; the reason of a skip is logged) and, per decode step, the CUDA graph launches
and single kernel launches (a step replayed as one CUDA graph has one graph launch). Then the kernels of one decode
step: CUDA graph replays hide their kernels from the profiler, so this part compiles without CUDA graphs (same
kernels) and profiles two generate() calls, `--steps` and twice that many tokens; the difference, over `--steps`,
is one decode step with the prefill cancelled out. `--layer-kind` builds every layer of one kind, to tell which
kind costs what.

    python benchmarks/profile_decode.py --preset 13b --layers 6 --batch 32 --context 1024
    python benchmarks/profile_decode.py --preset 13b --layers 4 --layer-kind dynamic_attention
    python benchmarks/profile_decode.py --preset tiny --device cpu --batch 2 --context 64   # smoke test
"""

import argparse
from collections import Counter

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig, GenerationConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.configuration_fastgpt import LAYER_TYPES
from fastgpt_hf.training import llama_config


def profile_generate(model, prompt: torch.Tensor, new_tokens: int, compile_mode: str) -> profile:
    """Profile of one greedy generate() of `new_tokens` tokens after two unprofiled warm-up calls."""
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation="static",
        compile_config=CompileConfig(mode=compile_mode),
    )
    attention_mask = torch.ones_like(prompt)
    with torch.no_grad():
        for _ in range(2):
            model.generate(prompt, attention_mask=attention_mask, generation_config=config)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompt.is_cuda else [])
        with profile(activities=activities) as profiler:
            model.generate(prompt, attention_mask=attention_mask, generation_config=config)
            if prompt.is_cuda:
                torch.cuda.synchronize()
    return profiler


def compile_summary(model, prompt: torch.Tensor, steps: int) -> list[str]:
    counters.clear()
    events = profile_generate(model, prompt, steps + 1, "reduce-overhead").key_averages()
    counts = {event.key: event.count for event in events}
    return [
        f"  compile: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph "
        f"breaks {dict(counters['graph_break'])}, {counters['inductor']['cudagraph_skips']} CUDA graph skips",
        f"  per decode step: {counts.get('cudaGraphLaunch', 0) / steps:.1f} graph launches, "
        f"{counts.get('cudaLaunchKernel', 0) / steps:.1f} single kernel launches (the prefill's included)",
    ]


def step_times(model, prompt: torch.Tensor, steps: int) -> Counter:
    """Milliseconds per decode step of each kernel (each operator on a CPU), without CUDA graphs."""
    on_gpu = prompt.is_cuda
    totals = []
    for new_tokens in (steps + 1, 2 * steps + 1):
        times = Counter()
        for event in profile_generate(model, prompt, new_tokens, "default").key_averages():
            if on_gpu and event.device_type == DeviceType.CUDA:
                times[event.key] += event.self_device_time_total / 1000
            elif not on_gpu and event.key.startswith("aten::"):
                times[event.key] += event.self_cpu_time_total / 1000
        totals.append(times)
    return Counter({key: (totals[1][key] - totals[0][key]) / steps for key in totals[1]})


def kernel_table(times: Counter, rows: int) -> list[str]:
    lines = [f"  one decode step: {sum(times.values()):.3f} ms in {len(times)} kernels; the most costly:"]
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
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
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
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device=args.device)
    print(f"preset {args.preset}, layers {config.layer_types}, batch {args.batch} x context {args.context}")
    for name, model in models.items():
        print(f"{name}:")
        print("\n".join(compile_summary(model, prompt, args.steps)))
        torch._dynamo.reset()
        print("\n".join(kernel_table(step_times(model, prompt, args.steps), args.rows)))
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
