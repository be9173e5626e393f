"""32K-token forward passes on the CPU, and peak memory that grows linearly for sliding and dynamic layers.

Each measurement runs in a fresh Python process that builds the model, then forks: the child's peak resident
memory (`ru_maxrss`) starts from its size at the fork, so imports and model building do not hide the forward pass's
own peak. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once.
"""

import json
import os
import subprocess
import sys

import pytest

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


def test_forward_over_32768_tokens_with_every_layer_kind():
    result = measure_forward(32768, ["sliding_attention", "dynamic_attention", "full_attention"])
    assert result["finite"]


@pytest.mark.parametrize("layer_type", ["sliding_attention", "dynamic_attention"])
def test_peak_memory_grows_linearly_for_windowed_layers(layer_type):
    """4x the tokens: about 4x the memory (a quadratic term would give 16x)."""
    short = measure_forward(8192, [layer_type] * 2, batch=4)
    long = measure_forward(32768, [layer_type] * 2, batch=4)
    assert long["finite"] and short["finite"]
    assert long["growth_kib"] < 6 * short["growth_kib"], (short, long)
