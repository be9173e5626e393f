"""Generation-state bytes of FastGPT against a LlamaForCausalLM of the same shape: per preset, and measured.

- Per preset (`--context`, batch 1, bf16): FastGPT's cache read off real cache buffers (`floors.fastgpt_cache_bytes`:
  a `FastGPTStaticCache` allocated on the meta device; at a full context it holds exactly what the dynamic cache
  holds: every position for full layers, `window - 1` for sliding and dynamic layers (the static buffers hold one
  slot more: the newest token beside its ring), and the dynamic layers' compressed entries (bf16) and real-token
  counts per block and their open block's key/value sums (float32)); Llama's `DynamicCache` holds every position of
  every layer.
- Measured (`--shapes BxC ...`, the `--preset` pair on `--device`): each model's default dynamic cache after a C-token
  prompt fed in chunks of 1,024, its bytes counted tensor by tensor (`fastgpt_hf.benchmarking.cache_bytes`), and on a
  GPU the peak memory of that prefill (this model's weights plus what it allocated).

    python benchmarks/bench.py memory --context 32768
    python benchmarks/bench.py memory --preset 1b --shapes 1x32768 32x8192
"""

import argparse

import floors
import models
import torch

from fastgpt_hf import FastGPTConfig
from fastgpt_hf.benchmarking import cache_bytes
from fastgpt_hf.presets import PRESETS
from fastgpt_hf.quantization import weight_bytes

PREFILL_CHUNK = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models.add_model_arguments(parser, preset="1b")
    parser.add_argument("--context", type=int, default=32768, help="positions of the per-preset table")
    parser.add_argument("--shapes", nargs="*", default=[], help="BATCHxCONTEXT to measure on --device")


def run(args: argparse.Namespace) -> None:
    preset_table(args.context)
    if args.shapes:
        device, dtype = models.device_and_dtype(args)
        config = models.fastgpt_config(args)
        print(f"\ndevice: {floors.device_name(device)}, torch {torch.__version__}; preset {args.preset}, {dtype}")
        measured_table(models.model_pair(config, device, dtype), [models.parse_shape(s) for s in args.shapes])


def preset_table(context: int) -> list[str]:
    rows = [
        f"Cache bytes at {context} positions, batch 1, bf16:",
        "",
        "| preset | layers (S/D/F) | FastGPT MiB | Llama MiB | FastGPT / Llama |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name in PRESETS:
        config = FastGPTConfig.from_preset(name, max_position_embeddings=max(context, 32768))
        fastgpt, llama = floors.fastgpt_cache_bytes(config, context), floors.llama_cache_bytes(config, context)
        kinds = "/".join(
            str(config.layer_types.count(kind)) for kind in ("sliding_attention", "dynamic_attention", "full_attention")
        )
        rows.append(f"| {name} | {kinds} | {fastgpt / 2**20:.1f} | {llama / 2**20:.1f} | {fastgpt / llama:.3f} |")
    print("\n".join(rows), flush=True)
    return rows


def prefilled_cache_bytes(model, batch: int, context: int) -> tuple[int, float | None]:
    """Bytes of the model's default cache after `context` random tokens per row, and (GPU) the peak GiB."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(model.device)
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    cache = None
    with torch.no_grad():
        for chunk in prompt.split(PREFILL_CHUNK, dim=1):
            cache = model(chunk, cache=cache, use_cache=True, logits_to_keep=1).cache
    peak = (weight_bytes(model) + torch.cuda.max_memory_allocated() - resident) / 2**30 if on_gpu else None
    return cache_bytes(cache), peak


def measured_table(pair: dict, shapes: list[tuple[int, int]]) -> list[str]:
    rows = [
        "| batch x context | Llama cache MiB | FastGPT cache MiB | FastGPT / Llama | peak GiB Llama / FastGPT |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(rows), flush=True)
    for batch, context in shapes:
        (llama, llama_peak), (ours, our_peak) = (
            prefilled_cache_bytes(model, batch, context) for model in pair.values()
        )
        peaks = "-" if llama_peak is None else f"{llama_peak:.1f} / {our_peak:.1f}"
        rows.append(
            f"| {batch} x {context} | {llama / 2**20:.1f} | {ours / 2**20:.1f} | {ours / llama:.3f} | {peaks} |"
        )
        print(rows[-1], flush=True)
        if pair["FastGPT"].device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
