"""Prefill time of FastGPT against a LlamaForCausalLM of the same shape, side by side, on one CUDA device.

Both models get random bf16 weights of the chosen preset's shape and run `model(input_ids, logits_to_keep=1)` (what
generate() does for a prompt). Each model runs with every attention backend it supports, and its fastest is
reported. The floor is FLOPs over the measured bf16 matmul rate: dense projections and MLP, plus attention over the
score entries each layer actually computes (from `attention_sparsity`).

    python benchmarks/bench_prefill.py --preset 1b --lengths 2048 8192 32768
"""

import argparse

import torch
from transformers import LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
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


def best_prefill(model, input_ids) -> tuple[float, str, float]:
    """(fastest median ms, its backend, peak GiB) over BACKENDS."""
    results = []
    for backend in BACKENDS:
        model.set_attn_implementation(backend)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            milliseconds = median_ms(lambda: model(input_ids, logits_to_keep=1, use_cache=False))
        results.append((milliseconds, backend, torch.cuda.max_memory_allocated() / 2**30))
    return min(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(args.preset)
    peak = matmul_tflops()
    fastgpt = FastGPTForCausalLM(config).to("cuda", torch.bfloat16).eval()
    llama = LlamaForCausalLM(llama_config(config)).to("cuda", torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul {peak:.0f} TFLOP/s; preset {args.preset}")
    print("| tokens | Llama ms (backend) | FastGPT ms (backend) | speed-up | floor ms | peak GiB Llama/FastGPT |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in args.lengths:
        input_ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
        llama_ms, llama_backend, llama_gib = best_prefill(llama, input_ids)
        ours_ms, our_backend, our_gib = best_prefill(fastgpt, input_ids)
        floor_ms = prefill_flops(fastgpt, length) / (peak * 1e12) * 1e3
        print(
            f"| {length} | {llama_ms:.1f} ({llama_backend}) | {ours_ms:.1f} ({our_backend}) | "
            f"{llama_ms / ours_ms:.2f}x | {floor_ms:.1f} | {llama_gib:.1f} / {our_gib:.1f} |"
        )


if __name__ == "__main__":
    main()
