"""Where a compiled static-cache decode step spends its time: FastGPT and its Llama peer, profiled side by side.

`bench_gpu.py` gives the ms per token; this says why. Both models generate `--steps` tokens with
`cache_implementation="static"` (compiled, CUDA graphs on a GPU) after two warm-up runs, under `torch.profiler`. It
prints the compiled graphs, graph breaks and CUDA graph skips (dynamo's and inductor's counters; the reason of a
skip is logged), per decode step the CUDA graph launches, single kernel launches and aten ops run from Python (a
step replayed as one CUDA graph has one graph launch and few ops), then the top operators by self device time (CPU
time without a GPU).

    python benchmarks/profile_decode.py --preset 13b --layers 6 --batch 32 --context 1024
    python benchmarks/profile_decode.py --preset tiny --device cpu --batch 2 --context 64   # smoke test
"""

import argparse

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile
from transformers import GenerationConfig, LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.training import llama_config


def profile_generate(model, prompt: torch.Tensor, steps: int) -> profile:
    config = GenerationConfig(
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation="static",
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


def summary(profiler: profile, steps: int, on_gpu: bool) -> list[str]:
    events = profiler.key_averages()
    counts = {event.key: event.count for event in events}
    aten_calls = sum(event.count for event in events if event.key.startswith("aten::"))
    lines = [
        f"  compile: {counters['stats']['unique_graphs']} graphs, {sum(counters['graph_break'].values())} graph "
        f"breaks {dict(counters['graph_break'])}, {counters['inductor']['cudagraph_skips']} CUDA graph skips",
        f"  per decode step: {counts.get('cudaGraphLaunch', 0) / steps:.1f} graph launches, "
        f"{counts.get('cudaLaunchKernel', 0) / steps:.1f} kernel launches, {aten_calls / steps:.0f} aten ops "
        "(the prefill's included)",
    ]
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    lines.append(events.table(sort_by=sort_key, row_limit=12, max_name_column_width=60))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="13b")
    parser.add_argument("--layers", type=int, help="fewer layers than the preset (the default layer layout of that)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    torch._logging.set_logs(perf_hints=True)  # inductor logs why it skips CUDA graphs
    torch.manual_seed(0)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = FastGPTConfig.from_preset(args.preset, **overrides)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        models = {"Llama": LlamaForCausalLM(llama_config(config)).eval(), "FastGPT": FastGPTForCausalLM(config).eval()}
    torch.set_default_dtype(torch.float32)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.context), device=args.device)
    print(f"preset {args.preset}, layers {config.layer_types}, batch {args.batch} x context {args.context}")
    for name, model in models.items():
        print(f"{name}:")
        counters.clear()
        print("\n".join(summary(profile_generate(model, prompt, args.steps), args.steps, args.device == "cuda")))
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
