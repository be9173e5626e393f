"""Decode step time after a long context on the CPU: FastGPT's dynamic layers against Llama of the same shape.

Not a test. A stack of `dynamic_attention` layers only (the layer kind whose state grows with the context, as
length / b compressed blocks) and a LlamaForCausalLM of the same shape, random float32 weights, each with its
default dynamic cache: the context is fed in chunks of 1,024, then the median wall time of `--steps` one-token
forward passes is printed side by side. With blocks of 16, 8,192 positions are 512 blocks per row.

    python benchmarks/decode_long_context_cpu.py --batch 8 --context 8192
"""

import argparse
import time

import torch
from transformers import LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.training import llama_config


def decode_ms(model, batch: int, context: int, steps: int) -> float:
    """Median ms of a one-token forward pass after `context` tokens, through the model's default cache."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    cache = None
    with torch.no_grad():
        for chunk in prompt.split(1024, dim=1):
            cache = model(chunk, cache=cache, use_cache=True).cache
        token = prompt[:, -1:]
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            model(token, cache=cache, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = FastGPTConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=128,
        layer_types=["dynamic_attention"] * args.layers,
        dynamic_window=256,
        compress_block_size=16,
        max_position_embeddings=max(args.context + 1, 32768),
    )
    models = {"Llama": LlamaForCausalLM(llama_config(config)).eval(), "FastGPT": FastGPTForCausalLM(config).eval()}
    milliseconds = {name: decode_ms(model, args.batch, args.context, args.steps) for name, model in models.items()}
    print(f"decode ms/step, batch {args.batch} after {args.context} tokens, {args.layers} layers, CPU float32")
    print(
        f"Llama {milliseconds['Llama']:.1f}  FastGPT {milliseconds['FastGPT']:.1f}  "
        f"FastGPT speed vs Llama {milliseconds['Llama'] / milliseconds['FastGPT']:.2f}x"
    )


if __name__ == "__main__":
    main()
