"""The CUDA paths against the float64 reference: sdpa and flex_attention kernels in bf16 and float32.

Tolerances are relative, ||out - ref|| / ||ref|| over real tokens: bf16 operands land between 1e-3 and 1e-2,
float32 (TF32 off) far under 1e-3.
"""

import pytest
import torch

from fastgpt_hf.attention_reference import reference_logits

from .conftest import left_padded_batch, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI machines have none"),
]
RELATIVE_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
# Windows and blocks that span several of flex_attention's 128 x 128 tiles.
LONG_WINDOWS = {"sliding_window": 64, "dynamic_window": 192, "compress_block_size": 16, "num_memory_tokens": 4}


def relative_error(output: torch.Tensor, reference: torch.Tensor, attention_mask: torch.Tensor) -> float:
    real = attention_mask.bool()
    difference = output.double()[real] - reference[real]
    return (difference.norm() / reference[real].norm()).item()


@pytest.mark.parametrize("length", [77, 1000], ids=lambda length: f"T{length}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention", "eager"])
def test_cuda_backend_matches_reference(backend, dtype, length):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("mixed", backend, dtype=dtype, initializer_range=0.05, **LONG_WINDOWS).cuda()
    input_ids, attention_mask = left_padded_batch(length)
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        reference = reference_logits(model, input_ids, attention_mask)
    assert relative_error(logits, reference, attention_mask) < RELATIVE_TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_cuda_gradients_match_reference(backend):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("mixed", backend, dtype=torch.float32, initializer_range=0.05, **LONG_WINDOWS).cuda()
    input_ids, attention_mask = left_padded_batch(300)
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    probe = torch.randn(*input_ids.shape, model.config.vocab_size, device="cuda") * attention_mask[..., None]

    def gradients(compute_logits) -> torch.Tensor:
        model.zero_grad()
        (compute_logits().float() * probe).sum().backward()
        return torch.cat([parameter.grad.flatten() for parameter in model.parameters()])

    fast = gradients(lambda: model(input_ids, attention_mask=attention_mask).logits)
    reference = gradients(lambda: reference_logits(model, input_ids, attention_mask))
    assert ((fast - reference).norm() / reference.norm()).item() < 1e-4


def test_compiled_static_decode_replays_cuda_graphs():
    """generate()'s own compile of the static-cache decode step (inductor, reduce-overhead): one graph, no CUDA
    graph skipped (inductor logs the reason of a skip), the dynamic cache's tokens (float32, TF32 off)."""
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("mixed", "sdpa", dtype=torch.float32, **LONG_WINDOWS).cuda()
    input_ids, attention_mask = left_padded_batch(300)
    input_ids, attention_mask = input_ids.cuda(), attention_mask.cuda()
    options = {"attention_mask": attention_mask, "max_new_tokens": 16, "do_sample": False}
    expected = model.generate(input_ids, **options)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(input_ids, cache_implementation="static", **options)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert torch.equal(compiled, expected)


@pytest.mark.parametrize("cache_implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches_give_the_dynamic_cache_tokens(cache_implementation):
    """Transformers' cache offloading (layers moved to the CPU between uses; CUDA streams, so GPU only)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("mixed", "sdpa", dtype=torch.float32, **LONG_WINDOWS).cuda()
    input_ids, attention_mask = left_padded_batch(300)
    options = {"attention_mask": attention_mask.cuda(), "max_new_tokens": 16, "do_sample": False}
    expected = model.generate(input_ids.cuda(), **options)
    offloaded = model.generate(input_ids.cuda(), cache_implementation=cache_implementation, **options)
    assert torch.equal(offloaded, expected)


@pytest.mark.parametrize("layer_kind", ["sliding or full", "dynamic"])
def test_compiled_one_token_update_writes_slots_not_the_buffers(layer_kind):
    """Inductor's kernels for a decode step's cache update touch a few slots and blocks: none spans a `[B, K, N + 1,
    D]` key buffer or a `[B, K, C, D]` block buffer (two writes into one buffer once made inductor copy all of it
    every step, 3x slower decode at 13b; a scatter into block sums does the same)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from fastgpt_hf.cache_fastgpt import StaticCompressedLayer, StaticRolledLayer

    dynamic = layer_kind == "dynamic"
    layer = StaticCompressedLayer(4096, 1023, 16) if dynamic else StaticRolledLayer(4096, 1023)
    new_keys = torch.randn(2, 4, 1, 64, device="cuda")
    layer.lazy_initialization(new_keys, new_keys)
    compressor = torch.nn.Linear(64, 64, device="cuda")
    positions = torch.full((2, 1), 100, device="cuda")

    def decode_update(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        cached_keys, cached_values = layer.update(keys, values)
        output = cached_keys[:, :, -1] + cached_values[:, :, -1]
        if dynamic:
            compressed_keys, _, _ = layer.add_and_compress(
                keys,
                values,
                positions,
                None,
                lambda key_means, value_means: (compressor(key_means), compressor(value_means)),
            )
            output = output + compressed_keys[:, :, 0]
        return output

    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(decode_update, fullgraph=True), new_keys, new_keys)
    kernel_sizes = [int(size) for size in re.findall(r"xnumel = (\d+)", "\n".join(code))]
    buffers = [layer.keys, *(layer.block_buffers() if dynamic else [])]
    assert kernel_sizes, "no triton kernel generated"
    assert max(kernel_sizes) < min(buffer.numel() for buffer in buffers if buffer.dim() == 4) // 100
    assert torch.equal(layer.keys[:, :, -1], new_keys[:, :, 0])
