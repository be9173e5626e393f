"""Largest error of each attention backend against the float64 reference, per dtype and device.

Prints max |logits - reference| over real tokens and the relative error ||diff|| / ||reference|| for a mixed
sliding / dynamic / full stack on a left-padded batch whose length crosses several windows and blocks.

    python benchmarks/bench.py reference --device cpu     # float64 and float32
    python benchmarks/bench.py reference --device cuda    # float32 and bf16
"""

import argparse

import torch
from models import DeviceUnavailable

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.attention_reference import reference_logits

LAYER_TYPES = ["sliding_attention", "dynamic_attention", "full_attention", "dynamic_attention"]


def errors(backend: str, dtype: torch.dtype, device: str, length: int) -> tuple[float, float]:
    torch.manual_seed(0)
    config = FastGPTConfig.from_preset(
        "tiny",
        layer_types=LAYER_TYPES,
        num_hidden_layers=len(LAYER_TYPES),
        sliding_window=64,
        dynamic_window=192,
        compress_block_size=16,
        num_memory_tokens=4,
        initializer_range=0.05,
        attn_implementation=backend,
    )
    model = FastGPTForCausalLM(config).to(device, dtype).eval()
    input_ids = torch.randint(0, config.vocab_size, (3, length), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    attention_mask[2, : length // 2] = 0
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits.double()
        reference = reference_logits(model, input_ids, attention_mask)
    real = attention_mask.bool()
    difference = logits[real] - reference[real]
    return difference.abs().max().item(), (difference.norm() / reference[real].norm()).item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cpu", help="cuda: float32 and bf16")
    parser.add_argument("--length", type=int, default=1000)


def run(args: argparse.Namespace) -> None:
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: this machine has no CUDA device; --device cpu runs it on the CPU.")
    dtypes = [torch.float32, torch.bfloat16] if on_gpu else [torch.float64, torch.float32]
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'cpu'}; length {args.length}, left-padded batch")
    print("| backend | dtype | max abs error | relative error |")
    print("| --- | --- | ---: | ---: |")
    for backend in ("eager", "sdpa", "flex_attention"):
        for dtype in dtypes:
            max_error, relative = errors(backend, dtype, args.device, args.length)
            print(f"| {backend} | {str(dtype).removeprefix('torch.')} | {max_error:.2e} | {relative:.2e} |", flush=True)
