"""Training-step time of each FastGPT attention backend beside the same-shape Llama, on this machine's device.

Not a test. One step = forward, backward and AdamW on a random batch, best of `--repeats` after a warm-up. The
default shape is the demo's (the `small` preset cut to 6 layers of width 128, windows 64 / 128, blocks of 16).
flex_attention has no backward on the CPU, so it is skipped there.

    python benchmarks/train_backends.py [--batch-size 8 --block-size 256 --repeats 3]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.training import llama_peer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo import DEMO_OVERRIDES  # noqa: E402  (the demo's shape)


def step_seconds(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        timings.append(time.perf_counter() - start)
    return min(timings[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = ["sdpa", "eager"] + (["flex_attention"] if device == "cuda" else [])
    input_ids = torch.randint(0, 16384, (args.batch_size, args.block_size), device=device)
    tokens = input_ids.numel()
    print(f"{'model':>24} {'s/step':>8} {'tokens/s':>9}")
    for backend in backends:
        torch.manual_seed(0)
        config = FastGPTConfig.from_preset("small", **{**DEMO_OVERRIDES, "attn_implementation": backend})
        seconds = step_seconds(FastGPTForCausalLM(config).to(device), input_ids, args.repeats)
        print(f"{'FastGPT ' + backend:>24} {seconds:>8.3f} {tokens / seconds:>9.0f}", flush=True)
    torch.manual_seed(0)
    sdpa_config = FastGPTConfig.from_preset("small", **DEMO_OVERRIDES)
    seconds = step_seconds(llama_peer(sdpa_config).to(device), input_ids, args.repeats)
    print(f"{'Llama sdpa':>24} {seconds:>8.3f} {tokens / seconds:>9.0f}")


if __name__ == "__main__":
    main()
