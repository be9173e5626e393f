"""Generation-state bytes at a 32K context: FastGPT's cache per preset next to Llama's DynamicCache of the same shape.

Not a test. FastGPT's figure is read off real cache buffers: a `FastGPTStaticCache` for the context, allocated on
the meta device (shapes and dtypes, no memory), in bf16 at batch 1. At a full context it holds exactly what the
dynamic cache holds: every position for full layers, `window - 1` for sliding and dynamic layers (the static
buffers hold one slot more: the newest token beside its ring), and the dynamic layers' compressed entries (bf16)
and real-token counts per block and their open block's key/value sums (float32). Llama's `DynamicCache` holds
every position of every layer: 2 (keys, values) * layers * kv_heads * head_dim * context * 2 bytes.

    python benchmarks/cache_bytes.py [--context 32768]
"""

import argparse

import torch

from fastgpt_hf import FastGPTConfig
from fastgpt_hf.cache_fastgpt import FastGPTStaticCache
from fastgpt_hf.presets import PRESETS

BF16_BYTES = 2


def fastgpt_cache_bytes(config: FastGPTConfig, context: int) -> int:
    """Bytes of every tensor a FastGPT cache holds after `context` positions (batch 1, bf16 keys and values)."""
    cache = FastGPTStaticCache(config, max_cache_len=context)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, torch.bfloat16, torch.device("meta"))
    return sum(buffer.numel() * buffer.element_size() for layer in cache.layers for buffer in layer.batch_buffers())


def llama_cache_bytes(config: FastGPTConfig, context: int) -> int:
    """Bytes of a LlamaForCausalLM DynamicCache of the same shape after `context` positions (batch 1, bf16)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * BF16_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    context = parser.parse_args().context
    print(f"cache bytes at {context} positions, batch 1, bf16")
    print(f"{'preset':>7} {'layers (S/D/F)':>15} {'FastGPT MiB':>12} {'Llama MiB':>10} {'FastGPT/Llama':>14}")
    for name in PRESETS:
        config = FastGPTConfig.from_preset(name, max_position_embeddings=max(context, 32768))
        fastgpt, llama = fastgpt_cache_bytes(config, context), llama_cache_bytes(config, context)
        kinds = "/".join(
            str(config.layer_types.count(kind)) for kind in ("sliding_attention", "dynamic_attention", "full_attention")
        )
        print(f"{name:>7} {kinds:>15} {fastgpt / 2**20:>12.1f} {llama / 2**20:>10.1f} {fastgpt / llama:>14.3f}")


if __name__ == "__main__":
    main()
