"""Prefill time through each cache on the CPU: FastGPT against Llama of the same shape, side by side.

Not a test. One forward pass over a `--length`-token prompt (batch 1, no padding, float32, random weights) with no
cache, with each model's dynamic cache and with its static cache (`cache_implementation="static"`'s, sized for the
prompt plus 64 tokens), median wall ms of `--repeats`. A prefill into an empty cache should cost what the pass
without a cache costs: the static cache's empty slots are not attention work.

    python benchmarks/prefill_cache_cpu.py --length 4096
"""

import argparse
import time

import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache
from fastgpt_hf.training import llama_config

NEW_TOKENS = 64


def prefill_ms(model, prompt: torch.Tensor, new_cache, repeats: int) -> float:
    """Median wall ms of one forward pass over `prompt` into `new_cache()` (None: no cache)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            cache = new_cache()
            start = time.perf_counter()
            model(prompt, attention_mask=torch.ones_like(prompt), cache=cache, use_cache=cache is not None)
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = FastGPTConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=256,
        dynamic_window=512,
        compress_block_size=64,
        max_position_embeddings=args.length + NEW_TOKENS,
        attn_implementation="sdpa",
    )
    peer_config = llama_config(config)
    max_cache_len = args.length + NEW_TOKENS
    caches = {
        "Llama": {
            "none": lambda: None,
            "dynamic": lambda: DynamicCache(config=peer_config),
            "static": lambda: StaticCache(config=peer_config, max_cache_len=max_cache_len),
        },
        "FastGPT": {
            "none": lambda: None,
            "dynamic": lambda: FastGPTDynamicCache(config),
            "static": lambda: FastGPTStaticCache(config, max_cache_len),
        },
    }
    models = {"Llama": LlamaForCausalLM(peer_config).eval(), "FastGPT": FastGPTForCausalLM(config).eval()}
    prompt = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    print(f"prefill ms, {args.length} tokens, batch 1, {config.num_hidden_layers} layers {config.layer_types}, CPU")
    print("| cache | Llama ms | FastGPT ms | FastGPT speed vs Llama |")
    print("| --- | ---: | ---: | ---: |")
    for cache_kind in ("none", "dynamic", "static"):
        llama, fastgpt = (prefill_ms(models[name], prompt, caches[name][cache_kind], args.repeats) for name in models)
        print(f"| {cache_kind} | {llama:.1f} | {fastgpt:.1f} | {llama / fastgpt:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
