"""32K-token forward passes on the CPU: one pass equals cached chunks, and peak memory grows linearly for sliding
and dynamic layers.

Each memory measurement runs in a fresh Python process that builds the model, then forks: the child's peak resident
memory (`ru_maxrss`) starts from its size at the fork, so imports and model building do not hide the forward pass's
own peak. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache

MEASURE = """
import json, os, resource, sys, time, torch
from fastgpt_hf import FastGPTConfig, FastGPTForCausalLM
length, layer_types, batch = int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
torch.manual_seed(0)
config = FastGPTConfig.from_preset(
    "tiny", layer_types=layer_types, num_hidden_layers=len(layer_types),
    sliding_window=64, dynamic_window=128, compress_block_size=16,
)
model = FastGPTForCausalLM(config).eval()
input_ids = torch.randint(0, config.vocab_size, (batch, length))
if os.fork() != 0:
    sys.exit(os.wait()[1] >> 8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    hidden = model.model(input_ids).last_hidden_state
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "seconds": seconds, "finite": bool(hidden.isfinite().all())}))
"""


def measure_forward(length: int, layer_types: list[str], batch: int = 1) -> dict:
    """Peak memory growth (KiB) and seconds of one no-grad forward, in a fresh process."""
    command = [sys.executable, "-c", MEASURE, str(length), ",".join(layer_types), str(batch)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True, env=environment)
    return json.loads(finished.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_32768_tokens_in_one_pass_equal_them_in_cached_chunks():
    """Every layer kind over 32,768 tokens in one forward pass, against the same tokens fed through the dynamic cache
    in chunks of 4,096 (each path is held to the float64 reference at short lengths; here they must agree at 32K:
    2,048 blocks, a global branch in several sdpa calls). Measured: 7e-7 apart, hidden states of std 1."""
    config = FastGPTConfig.from_preset(
        "tiny",
        layer_types=["sliding_attention", "dynamic_attention", "full_attention"],
        num_hidden_layers=3,
        sliding_window=64,
        dynamic_window=128,
        compress_block_size=16,
    )
    torch.manual_seed(0)
    model = FastGPTForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, 32768), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_pass = model.model(input_ids).last_hidden_state
        cache = FastGPTDynamicCache(config)
        chunks = [
            model.model(chunk, cache=cache, use_cache=True).last_hidden_state for chunk in input_ids.split(4096, 1)
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_pass, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layer_type", ["sliding_attention", "dynamic_attention"])
def test_peak_memory_grows_linearly_for_windowed_layers(layer_type):
    """4x the tokens: about 4x the memory (a quadratic term would give 16x)."""
    short = measure_forward(8192, [layer_type] * 2, batch=4)
    long = measure_forward(32768, [layer_type] * 2, batch=4)
    assert long["finite"] and short["finite"]
    assert long["growth_kib"] < 6 * short["growth_kib"], (short, long)
