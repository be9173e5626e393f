"""Largest error of each attention backend against the float64 reference, per dtype and device.

Prints max |logits - reference| over real tokens and the relative error ||diff|| / ||reference|| for a mixed
sliding / dynamic / full stack on a left-padded batch whose length crosses several windows and blocks.

    python benchmarks/reference_errors.py            # CPU: float64 and float32
    python benchmarks/reference_errors.py --cuda     # GPU: float32 and bf16
"""

import argparse

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="run on the GPU in float32 and bf16")
    parser.add_argument("--length", type=int, default=1000)
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    dtypes = [torch.float32, torch.bfloat16] if args.cuda else [torch.float64, torch.float32]
    if args.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name() if args.cuda else 'cpu'}; length {args.length}, left-padded batch")
    print("| backend | dtype | max abs error | relative error |")
    print("| --- | --- | ---: | ---: |")
    for backend in ("eager", "sdpa", "flex_attention"):
        for dtype in dtypes:
            max_error, relative = errors(backend, dtype, device, args.length)
            print(f"| {backend} | {str(dtype).removeprefix('torch.')} | {max_error:.2e} | {relative:.2e} |")


if __name__ == "__main__":
    main()
