"""Operators per decode step, by layer kind: FastGPT against Llama of the same shape, counted on the CPU.

Not a test. Where a decode step is launch-bound (eager generate() with the default dynamic cache on a GPU, small
batches), its cost follows the number of operators dispatched, which does not depend on the machine. For each
layer kind this builds `--layers` layers of it (the tiny preset's width), feeds a `--context`-token prompt through
the default cache and counts, for one one-token step, the operators dispatched (views, which launch nothing, apart)
with both models side by side. Then the median wall ms of `--steps` such steps on one thread, which on a shared
machine is only indicative.

    python benchmarks/decode_ops_cpu.py --layers 8 --context 256
"""

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.configuration_fastgpt import LAYER_TYPES
from fastgpt_hf.training import llama_config


class OperatorCount(TorchDispatchMode):
    """Counts aten operators dispatched while active: views and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.views = self.others = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def decode_step_cost(model, context: int, steps: int) -> tuple[OperatorCount, float]:
    """Operators of one one-token step after `context` tokens, and the median wall ms of `steps` steps."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).cache
        token = prompt[:, -1:]
        counter = OperatorCount()
        with counter:
            cache = model(token, cache=cache, use_cache=True).cache
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            cache = model(token, cache=cache, use_cache=True).cache
            times.append((time.perf_counter() - start) * 1e3)
    return counter, sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"{args.layers} layers of each kind, tiny preset's width, batch 1, {args.context} tokens of context")
    print("| layer kind | FastGPT ops (views) | Llama ops (views) | ops ratio | FastGPT ms | Llama ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in LAYER_TYPES:
        config = FastGPTConfig.from_preset("tiny", num_hidden_layers=args.layers, layer_types=[kind] * args.layers)
        ours, ours_ms = decode_step_cost(FastGPTForCausalLM(config).eval(), args.context, args.steps)
        peer, peer_ms = decode_step_cost(LlamaForCausalLM(llama_config(config)).eval(), args.context, args.steps)
        print(
            f"| {kind} | {ours.others} ({ours.views}) | {peer.others} ({peer.views}) | "
            f"{ours.others / peer.others:.2f} | {ours_ms:.2f} | {peer_ms:.2f} |"
        )


if __name__ == "__main__":
    main()
