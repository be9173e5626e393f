"""The int8 key/value static cache (`cache_quantization`, `attention_quantized`) against float64 references.

Tolerances:
- quantize / dequantize: every element within half a quantization step, `scale / 2 = max |x| / 254` of its vector
  (plus 1e-4 of it: the scale is kept in float32, whose rounding, up to 2^-24 of it, an int8 of 127 multiplies).
- the decode step's int8 reduction form against float64 softmax attention over the dequantized keys and values:
  1e-10 (float64 queries; measured about 1e-16). Both compute the same numbers, in another order.
- a float64 model with the int8 cache against `reference_logits(..., kv_quantization="int8")`, the dense reference
  whose windowed keys and values are rounded as the cache rounds them: 1e-9, the unquantized caches' tolerance
  (measured about 3e-14): each token is quantized once, alone, so chunking cannot change what is rounded. Against
  the exact reference the cache's logits differ by the rounding's own effect, which the quantized reference gives:
  asserted no larger than that (plus 1e-9) and not zero (measured 0.19 to 0.27 on logits up to 6.7, tiny model at
  initializer_range 0.2).
- greedy generate(), float32, 3 left-padded rows of 12 tokens, 16 new: the same tokens as the float32 static cache
  (measured: all 48). Not true of every prompt: where a random model's top two logits are closer than the rounding
  moves them (up to about 0.3 here), greedy decoding may part ways (another prompt did after 8 tokens). So the test
  also asserts what holds for any prompt: each token the int8 cache chose is within 0.5 logit of the float model's
  best for the sequence so far.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from fastgpt_hf.attention_masks import windowed_visibility
from fastgpt_hf.attention_quantized import quantized_one_query_attention
from fastgpt_hf.attention_reference import reference_logits
from fastgpt_hf.benchmarking import cache_bytes
from fastgpt_hf.cache_fastgpt import FastGPTRowCache, FastGPTStaticCache
from fastgpt_hf.cache_quantization import QuantizedStates, dequantize, quantize
from fastgpt_hf.configuration_fastgpt import FastGPTConfig

from .conftest import STACKS, left_padded_batch, tiny_model
from .test_cache import CHUNKED_PREFILL_THEN_DECODE, LENGTH, incremental_logits, max_error_on_real_tokens

TOLERANCE = 1e-9
ATTENTION_TOLERANCE = 1e-10
SCHEDULES = {
    "chunked-prefill-then-decode": CHUNKED_PREFILL_THEN_DECODE,
    "chunk-after-ring-wrapped": [5] + [1] * 20 + [6] + [1] * (LENGTH - 31),
    "one-prefill": [LENGTH],
}


def int8_cache(config, max_cache_len: int = LENGTH, **options) -> FastGPTStaticCache:
    return FastGPTStaticCache(config, max_cache_len, kv_quantization="int8", **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_quantize_round_trip_is_within_half_a_step(dtype):
    generator = torch.Generator().manual_seed(0)
    # Vectors of very different sizes, one of zeros.
    states = torch.randn(2, 3, 7, 16, generator=generator, dtype=torch.float64) * torch.logspace(-3, 3, 7)[:, None]
    states[1, 2, 4] = 0
    states = states.to(dtype)
    quantized = quantize(states)
    assert quantized.data.dtype == torch.int8 and quantized.data.shape == states.shape
    assert quantized.scale.dtype == torch.float32 and quantized.scale.shape == (2, 3, 7, 1)
    assert quantized.data.abs().amax(-1).eq(127).sum() == 2 * 3 * 7 - 1  # each vector's largest element is +-127
    assert not quantized.data[1, 2, 4].any() and quantized.scale[1, 2, 4] == 0
    error = (dequantize(quantized) - states.double()).abs()
    step = states.double().abs().amax(-1, keepdim=True) / 127
    assert (error <= step / 2 * (1 + 1e-4)).all()
    assert dequantize(quantized, dtype).dtype == dtype


def float64_attention(query, keys, values, key_is_real, window, scaling, num_sink_tokens) -> torch.Tensor:
    """Softmax attention of `[B, H, 1, D]` queries over the dequantized keys and values, heads repeated, in float64;
    `[B, 1, H, D]`."""
    groups = query.shape[1] // keys.data.shape[1]
    key, value = (dequantize(states).repeat_interleave(groups, dim=1) for states in (keys, values))
    visible = windowed_visibility(1, key_is_real, key.shape[2], window, query.device, num_sink_tokens)
    scores = (query.double() @ key.transpose(-1, -2)) * scaling
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ value).transpose(1, 2)


@pytest.mark.parametrize("num_sink_tokens", [0, 2], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2)], ids=["G1", "G2", "G4"])
def test_decode_attention_reads_int8_as_float64_attention_over_the_dequantized_cache(
    heads, kv_heads, window, padded, num_sink_tokens
):
    generator = torch.Generator().manual_seed(0)
    batch, key_length, head_dim = 3, 13, 16
    query = torch.randn(batch, heads, 1, head_dim, generator=generator, dtype=torch.float64)
    keys, values = (
        quantize(torch.randn(batch, kv_heads, key_length, head_dim, generator=generator, dtype=torch.float64) * 3)
        for _ in range(2)
    )
    key_is_real = None
    if padded:
        key_is_real = torch.rand(batch, key_length, generator=generator) > 0.3
        key_is_real[:, -1] = True  # the query's own key
    arguments = (keys, values, key_is_real, window, head_dim**-0.5, num_sink_tokens)
    output = quantized_one_query_attention(query, *arguments)
    assert output.shape == (batch, 1, heads, head_dim) and output.dtype == torch.float64
    assert (output - float64_attention(query, *arguments)).abs().max() < ATTENTION_TOLERANCE


def test_decode_attention_returns_the_query_dtype_from_float32_sums():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 8, generator=generator).to(torch.bfloat16)
    keys, values = (quantize(torch.randn(2, 2, 9, 8, generator=generator)) for _ in range(2))
    output = quantized_one_query_attention(query, keys, values, None, None, 8**-0.5)
    assert output.dtype == torch.bfloat16
    reference = float64_attention(query, keys, values, None, None, 8**-0.5, 0)
    assert (output.double() - reference).abs().max() < 1e-2  # bf16's rounding of the output


def compiled_attention_buffers(device: str) -> tuple[list[int], int]:
    """Sizes (elements) of the buffers inductor's code of `quantized_one_query_attention` allocates, batch 4, 8 query
    heads over 4 key heads, 256 slots of 64; and the elements of the int8 keys, which a dequantized copy would have."""
    batch, heads, kv_heads, slots, head_dim = 4, 8, 4, 256, 64
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, 1, head_dim, generator=generator).to(device, torch.bfloat16)
    keys, values = (
        quantize(torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(device)) for _ in range(2)
    )
    key_is_real = (torch.rand(batch, slots, generator=generator) > 0.2).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(quantized_one_query_attention, fullgraph=True)
    _, code = run_and_get_code(compiled, query, keys, values, key_is_real, None, head_dim**-0.5)
    torch._dynamo.reset()
    shapes = re.findall(r"empty_strided\w*\(\(([\d, ]+)\)", "\n".join(code))
    return [math.prod(int(size) for size in shape.split(",") if size.strip()) for shape in shapes], keys.data.numel()


def test_compiled_decode_attention_allocates_no_dequantized_copy():
    """Inductor fuses the int8 -> float conversion into the reductions: its code allocates the scores and the
    output, nothing of the keys' size."""
    sizes, key_elements = compiled_attention_buffers("cpu")
    assert sizes, "no buffer found in inductor's code"
    assert max(sizes) < key_elements // 8


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("stack", list(STACKS))
def test_int8_cache_matches_the_reference_with_rounded_keys_and_values(stack, schedule):
    """Left-padded rows; the sliding (8) and dynamic (16) layers' rings wrap over the 40 tokens."""
    model = tiny_model(stack)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    logits = incremental_logits(model, input_ids, attention_mask, int8_cache(model.config), SCHEDULES[schedule])
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE
    exact = reference_logits(model, input_ids, attention_mask)
    rounding_effect = max_error_on_real_tokens(reference, exact, attention_mask)
    assert 1e-6 < max_error_on_real_tokens(logits, exact, attention_mask) <= rounding_effect + TOLERANCE


@pytest.mark.parametrize("schedule", ["chunked-prefill-then-decode", "chunk-after-ring-wrapped"])
def test_int8_cache_with_sinks_matches_the_reference(schedule):
    model = tiny_model("mixed", num_sink_tokens=3)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    logits = incremental_logits(model, input_ids, attention_mask, int8_cache(model.config), SCHEDULES[schedule])
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


def test_int8_cache_of_the_eager_backend_matches_the_reference():
    """The decode step's int8 form serves every backend; the prefill goes through the backend's own path."""
    model = tiny_model("mixed", attn_implementation="eager")
    input_ids, attention_mask = left_padded_batch(24)
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    logits = incremental_logits(model, input_ids, attention_mask, int8_cache(model.config, 24), [6] + [1] * 18)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


def test_reordered_and_reset_int8_cache_continues_those_rows():
    """Beam search's `reorder_cache` moves the scales with the int8 rows; `reset` forgets everything."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(LENGTH)
    order = torch.tensor([2, 0, 0])
    cache = int8_cache(model.config)
    incremental_logits(model, input_ids[:, :30], attention_mask[:, :30], cache, [30])
    cache.reorder_cache(order)
    reordered_ids, reordered_mask = input_ids[order], attention_mask[order]
    logits = incremental_logits(model, reordered_ids, reordered_mask, cache, [1] * 10, start=30)
    reference = reference_logits(model, reordered_ids, reordered_mask, kv_quantization="int8")
    assert max_error_on_real_tokens(logits, reference[:, 30:], reordered_mask[:, 30:]) < TOLERANCE
    cache.reset()
    assert not any(buffer.any() for layer in cache.layers for buffer in layer.slot_buffers())
    logits = incremental_logits(model, input_ids, attention_mask, cache, CHUNKED_PREFILL_THEN_DECODE)
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


def test_croppable_int8_cache_rolls_back():
    """A cache no longer than every window (8 positions) can crop; the rolled back slots' scales go with them."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(8)
    cache = int8_cache(model.config, 8)
    cache.activate_past_recording()
    incremental_logits(model, input_ids, attention_mask, cache, [4, 1, 1])
    cache.crop(-2)
    logits = incremental_logits(model, input_ids, attention_mask, cache, [1, 1, 1, 1], start=4)
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    assert max_error_on_real_tokens(logits, reference[:, 4:], attention_mask[:, 4:]) < TOLERANCE


def test_row_cache_copies_int8_rows_and_refuses_another_quantization():
    """The serving engine's rows: a prefilled int8 cache's rows copied in (scales too) decode as that cache would."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(LENGTH)
    source = int8_cache(model.config)
    incremental_logits(model, input_ids[:, :20], attention_mask[:, :20], source, [20])
    rows = FastGPTRowCache(model.config, LENGTH, max_rows=4, kv_quantization="int8")
    incremental_logits(model, input_ids[:1, :1].expand(4, 1), torch.zeros(4, 1, dtype=torch.long), rows, [1])
    rows.copy_rows(source, torch.tensor([3, 0, 1]))
    rows.row_lengths = [20] * 4
    reference = reference_logits(model, input_ids, attention_mask, kv_quantization="int8")
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for step in range(20, 25):
            token = slice(step, step + 1)
            row_ids = torch.zeros(4, 1, dtype=torch.long)
            row_ids[[3, 0, 1]] = input_ids[:, token]
            row_positions = torch.zeros(4, 1, dtype=torch.long)
            row_positions[[3, 0, 1]] = positions[:, token]
            row_mask = torch.tensor([[1], [1], [0], [1]])
            logits = model(row_ids, attention_mask=row_mask, position_ids=row_positions, cache=rows).logits
            rows.row_lengths = [length + 1 for length in rows.row_lengths]
            error = (logits[[3, 0, 1]] - reference[:, token]).abs().amax(-1)[attention_mask[:, token].bool()]
            assert error.max() < TOLERANCE
    with pytest.raises(ValueError, match=r"copy_rows takes a cache of kv_quantization='int8'.*got one of None"):
        rows.copy_rows(FastGPTStaticCache(model.config, LENGTH), torch.tensor([0]))


def test_int8_cache_holds_about_half_the_bytes_of_bf16():
    """The 13b preset (head_dim 128) at batch 32 x 1,024, allocated on the meta device: int8 and a float32 scale per
    128 numbers, 132 bytes for bf16's 256."""
    config = FastGPTConfig.from_preset("13b")
    held = {}
    for kv_quantization in (None, "int8"):
        cache = FastGPTStaticCache(config, 1024, kv_quantization=kv_quantization)
        cache.early_initialization(32, config.num_key_value_heads, config.head_dim, torch.bfloat16, "meta")
        held[kv_quantization] = cache_bytes(cache)
    assert 0.51 < held["int8"] / held[None] < 0.53


def test_int8_keys_are_returned_as_int8_in_decode_and_as_the_model_dtype_in_prefill():
    model = tiny_model("full", dtype=torch.float32)
    cache = int8_cache(model.config, 12)
    keys = torch.randn(2, model.config.num_key_value_heads, 5, model.config.head_dim)
    prefill_keys, _, _ = cache.update(keys, keys, 0)
    assert prefill_keys.dtype == torch.float32
    assert torch.equal(prefill_keys, dequantize(quantize(keys), torch.float32))
    decode_keys, decode_values, slot_is_real = cache.update(keys[:, :, :1], keys[:, :, :1], 0)
    assert isinstance(decode_keys, QuantizedStates) and decode_keys.data.dtype == torch.int8
    assert decode_keys.data is cache.layers[0].keys and decode_keys.scale is cache.layers[0].key_scales
    assert slot_is_real.sum().item() == 2 * 6


def test_bad_kv_quantization_is_refused_with_the_allowed_values():
    config = tiny_model("mixed").config
    with pytest.raises(ValueError, match=r"kv_quantization='int4' .* use one of \[None, 'int8'\]"):
        FastGPTStaticCache(config, LENGTH, kv_quantization="int4")


def greedy_options(new_tokens: int, **options) -> dict:
    return {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0, "eos_token_id": None, **options}


def test_greedy_generate_with_the_int8_cache_picks_the_float_models_best_tokens():
    model = tiny_model("mixed", dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(12)
    options = greedy_options(16, attention_mask=attention_mask, cache_implementation="static")
    exact = model.generate(input_ids, **options)
    quantized = model.generate(input_ids, cache_config={"kv_quantization": "int8"}, **options)
    assert torch.equal(quantized, exact)
    full_mask = F.pad(attention_mask, (0, 16), value=1)
    with torch.no_grad():
        logits = model(quantized, attention_mask=full_mask).logits[:, 11:-1]  # the float model on int8's tokens
    chosen = logits.gather(-1, quantized[:, 12:, None])[..., 0]
    assert (logits.amax(-1) - chosen).max() < 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cache_config": {"kv_quantization": "int8"}}, r"needs a static cache: .*cache_implementation=None, the defa"),
        ({"cache_implementation": "dynamic", "cache_config": {"kv_quantization": "int8"}}, r"needs a static cache"),
        (
            {"cache_implementation": "static", "cache_config": {"kv_quantization": "fp8"}},
            r"use one of \[None, 'int8'\]",
        ),
        ({"cache_implementation": "static", "cache_config": {"nbits": 4}}, r"one cache_config key, 'kv_quantization'"),
    ],
    ids=["default-dynamic", "dynamic", "unknown-value", "unknown-key"],
)
def test_generate_refuses_what_the_int8_cache_cannot_do(options, message):
    model = tiny_model("mixed")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.arange(1, 6)[None], **greedy_options(2, **options))


def test_generate_refuses_cache_config_that_a_given_cache_lacks():
    model = tiny_model("mixed")
    options = greedy_options(2, cache=FastGPTStaticCache(model.config, 8), cache_config={"kv_quantization": "int8"})
    with pytest.raises(ValueError, match=r"cache_config applies to the caches generate\(\) builds"):
        model.generate(torch.arange(1, 6)[None], **options)
    given = int8_cache(model.config, 8)
    model.generate(torch.arange(1, 6)[None], **{**options, "cache": given})
    assert int(given.get_seq_length()) == 6


@pytest.mark.slow  # about a minute of inductor's CPU compile
def test_compiled_int8_decode_matches_eager():
    """The decode step compiled by inductor (fullgraph) on the CPU: one graph for 20 steps past both windows, the
    eager step's logits (float64: 1e-9, the reductions summed in another order)."""
    from torch._dynamo.utils import counters

    model = tiny_model("mixed", num_sink_tokens=2)
    input_ids, attention_mask = left_padded_batch(30)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    eager_cache, compiled_cache = int8_cache(model.config, 30), int8_cache(model.config, 30)
    for cache in (eager_cache, compiled_cache):
        incremental_logits(model, input_ids, attention_mask, cache, [10])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for step in range(10, 30):
            token = slice(step, step + 1)
            inputs = {"attention_mask": attention_mask[:, token], "position_ids": positions[:, token]}
            expected = model(input_ids[:, token], cache=eager_cache, **inputs).logits
            logits = compiled(input_ids[:, token], cache=compiled_cache, **inputs).logits
            assert (logits - expected).abs().max() < TOLERANCE
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
