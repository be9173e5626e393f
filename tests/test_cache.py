"""FastGPT's caches against the float64 reference: incremental decoding equals the full forward pass.

Tolerance: float64 models, logits within 1e-9 of `reference_logits` (measured: about 4e-14). With attention sinks
both caches keep each row's first real tokens (the static cache in slots of their own, eager and compiled); ExecuTorch
export refuses them.
"""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from transformers import DynamicCache

from fastgpt_hf.attention_reference import reference_logits
from fastgpt_hf.cache_dynamic_layers import SinkTokens
from fastgpt_hf.cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache
from fastgpt_hf.cache_static_layers import StaticCompressedLayer, StaticRolledLayer

from .conftest import STACKS, left_padded_batch, tiny_model

TOLERANCE = 1e-9
LENGTH = 40  # crosses the sliding window (8), the dynamic window (16) and ten blocks of 4


def build_cache(kind: str, config, max_cache_len: int = LENGTH):
    return FastGPTDynamicCache(config) if kind == "dynamic" else FastGPTStaticCache(config, max_cache_len)


def incremental_logits(model, input_ids, attention_mask, cache, chunks: list[int], start: int = 0) -> torch.Tensor:
    """Logits `[B, T, V]` from feeding the sequence from `start` through `cache` in chunks of the given sizes."""
    logits = []
    with torch.no_grad():
        for size in chunks:
            end = start + size
            output = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], cache=cache, use_cache=True)
            logits.append(output.logits)
            start = end
    return torch.cat(logits, dim=1)


def max_error_on_real_tokens(logits, reference, attention_mask) -> float:
    return (logits - reference).abs().amax(-1)[attention_mask.bool()].max().item()


# Prefill 13, a chunk of 19 (longer than every window, with a past), then one token at a time.
CHUNKED_PREFILL_THEN_DECODE = [13, 19] + [1] * (LENGTH - 32)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_chunked_prefill_and_decode_match_the_reference(stack, cache_kind):
    model = tiny_model(stack)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = build_cache(cache_kind, model.config)
    logits = incremental_logits(model, input_ids, attention_mask, cache, CHUNKED_PREFILL_THEN_DECODE)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


def test_static_cache_takes_a_chunk_after_its_ring_has_wrapped():
    """Decode steps fill the static layers' rings past their windows; a later chunk reads the ring in time order."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = build_cache("static", model.config)
    schedule = [5] + [1] * 20 + [6] + [1] * (LENGTH - 31)
    logits = incremental_logits(model, input_ids, attention_mask, cache, schedule)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


@pytest.mark.parametrize("backend", ["eager", "flex_attention"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_token_by_token_decode_matches_the_reference_for_every_backend(backend, cache_kind):
    model = tiny_model("mixed", attn_implementation=backend)
    input_ids, attention_mask = left_padded_batch(24)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = build_cache(cache_kind, model.config, max_cache_len=24)
    logits = incremental_logits(model, input_ids, attention_mask, cache, [1] * 24)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_reordered_cache_continues_the_reordered_rows(cache_kind):
    """Beam search's `reorder_cache`: rows [2, 0, 0] continue exactly as those rows decoded from the start."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(LENGTH)
    order = torch.tensor([2, 0, 0])
    cache = build_cache(cache_kind, model.config)
    incremental_logits(model, input_ids[:, :30], attention_mask[:, :30], cache, [30])
    cache.reorder_cache(order)
    reordered_ids, reordered_mask = input_ids[order], attention_mask[order]
    with torch.no_grad():
        logits = model(reordered_ids[:, 30:], attention_mask=reordered_mask, cache=cache).logits
    reference = reference_logits(model, reordered_ids, reordered_mask)[:, 30:]
    assert max_error_on_real_tokens(logits, reference, reordered_mask[:, 30:]) < TOLERANCE


def test_state_stays_bounded_after_2000_tokens():
    """DESIGN.md section 4: sliding w - 1 positions, dynamic w - 1 plus one entry per block, full everything."""
    model = tiny_model("mixed", dtype=torch.float32)
    config = model.config
    cache = FastGPTDynamicCache(config)
    tokens = torch.randint(0, config.vocab_size, (1, 2001), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # chunks of 23 tokens keep the test fast; the state after each chunk is the same
        for chunk in tokens.split(23, dim=1):
            model(chunk, cache=cache, use_cache=True)
    sliding, dynamic, full, _ = cache.layers
    assert sliding.keys.shape[2] == config.sliding_window - 1
    assert dynamic.keys.shape[2] == config.dynamic_window - 1
    assert dynamic.num_blocks() == -(-2001 // config.compress_block_size)
    assert full.keys.shape[2] == 2001
    assert cache.get_seq_length() == 2001


def test_static_cache_keeps_its_buffers_in_place():
    """Fixed shapes and addresses across prefill, decode and reset: what compile and CUDA graphs need."""
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(LENGTH)
    cache = FastGPTStaticCache(model.config, max_cache_len=LENGTH)
    incremental_logits(model, input_ids[:, :2], attention_mask[:, :2], cache, [1, 1])
    buffers = [(buffer.data_ptr(), buffer.shape) for layer in cache.layers for buffer in layer.batch_buffers()]
    incremental_logits(model, input_ids, attention_mask, cache, [30, 1, 1], start=2)
    cache.reorder_cache(torch.tensor([1, 2, 0]))
    cache.reset()
    assert [(buffer.data_ptr(), buffer.shape) for layer in cache.layers for buffer in layer.batch_buffers()] == buffers
    sliding, dynamic, full, _ = cache.layers
    assert [sliding.keys.shape[2], dynamic.keys.shape[2], full.keys.shape[2]] == [8, 16, LENGTH]
    assert dynamic.block_counts.shape[1] == LENGTH // model.config.compress_block_size
    assert cache.get_seq_length() == 0


def test_first_static_prefill_attends_to_its_own_tokens_only():
    """A prefill into an empty static cache gets back its own keys, not the empty slots beside them: without padding
    no mask at all (the causal kernels), with padding the new tokens' mask."""
    model = tiny_model("mixed")
    key_states = torch.randn(3, 2, 12, 8, dtype=torch.float64)
    _, attention_mask = left_padded_batch(12)
    for mask, expected_mask in ((None, None), (attention_mask, attention_mask.bool())):
        cache = FastGPTStaticCache(model.config, max_cache_len=LENGTH)
        for layer_idx in range(len(cache.layers)):
            keys, _, key_is_real = cache.update(key_states, key_states, layer_idx, mask)
            assert torch.equal(keys, key_states)
            assert key_is_real is None if expected_mask is None else torch.equal(key_is_real, expected_mask)


@pytest.mark.slow
@pytest.mark.parametrize("past_tokens, sinks", [(0, 0), (5, 0), (20, 0), (20, 3)], ids=["0", "5", "20", "20-sinks"])
def test_compiled_prefill_update_stores_what_eager_stores(past_tokens, sinks):
    """Compiled code reads no token count, so its multi-token update also returns the slots never written (flagged
    not real) and the sink slots; both store the same slots and return the same real keys in the same order (after
    20 tokens, the 3 sinks that left the window of 16 first)."""
    layers = [StaticRolledLayer(64, 15, num_sink_tokens=sinks) for _ in range(2)]
    past, new = torch.randn(2, 2, past_tokens, 4), torch.randn(2, 2, 6, 4)
    returned = []
    for layer, update in zip(layers, (layers[0].update, torch.compile(layers[1].update, fullgraph=True)), strict=True):
        layer.lazy_initialization(new, new)
        if past_tokens:
            layer.update(past, past)
        torch._dynamo.reset()
        keys, _, key_is_real = update(new, new)
        returned.append((keys.shape[2], keys if key_is_real is None else keys[:, :, key_is_real[0]]))  # None: all real
    (eager_length, eager_keys), (compiled_length, compiled_keys) = returned
    sinks_returned = sinks if past_tokens > 16 else 0
    assert (eager_length, compiled_length) == (sinks_returned + min(past_tokens, 16) + 6, sinks + 16 + 6)
    assert torch.equal(eager_keys, compiled_keys)
    assert torch.equal(eager_keys[:, :, -6:], new)
    if sinks and past_tokens > 16:
        assert torch.equal(eager_keys[:, :, :3], past[:, :, :3])
    eager, compiled = layers
    for name in eager.state_names():
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name


def compiled_one_token_update(layer_kind: str, device: str) -> tuple[str, StaticRolledLayer]:
    """Inductor's code for one decode step's update of a static layer (ring of 1023 + 1 slots, with sinks 4 more;
    dynamic: blocks of 4 over 4096 positions, 1024 blocks) holding `[2, 4, *, 64]` keys, and the layer after that
    step."""
    dynamic = layer_kind == "dynamic"
    sinks = 4 if layer_kind == "sliding with sinks" else 0
    layer = StaticCompressedLayer(4096, 1023, 4) if dynamic else StaticRolledLayer(4096, 1023, num_sink_tokens=sinks)
    new_keys = torch.randn(2, 4, 1, 64, device=device)
    layer.lazy_initialization(new_keys, new_keys)
    compressor = torch.nn.Linear(64, 64, device=device)
    positions = torch.full((2, 1), 100, device=device)

    def compress(key_means: torch.Tensor, value_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compressor(key_means), compressor(value_means)

    def decode_update(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        cached_keys, cached_values, _ = layer.update(keys, values)
        output = cached_keys[:, :, -1] + cached_values[:, :, -1]
        if dynamic:
            means = layer.add_to_blocks(keys, values, positions, None)
            output = (
                output + layer.write_entries(*compress(means.key_means, means.value_means), means.written)[0][:, :, 0]
            )
        return output

    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(decode_update, fullgraph=True), new_keys, new_keys)
    assert torch.equal(layer.keys[:, :, -1], new_keys[:, :, 0])
    return "\n".join(code), layer


@pytest.mark.parametrize("layer_kind", ["sliding or full", "dynamic", "sliding with sinks"])
def test_compiled_one_token_update_loops_over_no_slots_or_blocks(layer_kind):
    """A compiled decode step writes a few slots and blocks in place: the CPU code's loops run over batch, heads and
    head_dim only (the open block's sums, `[2, 4, 64]`, flattened: 512). Two writes into one key buffer (the rolled
    layer's first version) and a scatter into the block sums each made inductor copy the whole buffer every step, in
    loops over its 1024 slots or blocks. With sinks, the new token also lands in its row's first sink slot."""
    code, layer = compiled_one_token_update(layer_kind, "cpu")
    if layer_kind == "sliding with sinks":
        assert torch.equal(layer.keys[:, :, 0], layer.keys[:, :, -1])
        assert layer.sink_counts.tolist() == [1, 1]
    loop_bounds = [int(bound) for bound in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", code)]
    assert loop_bounds, "no loop in the generated code"
    assert max(loop_bounds) < 1024


def test_static_cache_refuses_more_positions_than_it_holds():
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(12)
    cache = FastGPTStaticCache(model.config, max_cache_len=10)
    with pytest.raises(ValueError, match="static cache holds 10 positions"):
        incremental_logits(model, input_ids, attention_mask, cache, [12])


@pytest.mark.parametrize(
    "make_cache, message",
    [
        (lambda config: DynamicCache(), "needs a cache whose layers follow config.layer_types"),
        (lambda config: FastGPTDynamicCache(tiny_model("full").config), "build the cache from this model's config"),
    ],
    ids=["plain-dynamic-cache", "other-model"],
)
def test_foreign_cache_is_refused(make_cache, message):
    model = tiny_model("mixed")
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, 2, 3]]), cache=make_cache(model.config))


def test_cache_of_another_batch_size_is_refused():
    model = tiny_model("mixed")
    input_ids, attention_mask = left_padded_batch(8)
    cache = FastGPTDynamicCache(model.config)
    incremental_logits(model, input_ids, attention_mask, cache, [8])
    with pytest.raises(
        ValueError, match=r"\(batch, kv heads, head_dim\) = \(3, 2, 16\) but the input needs \(1, 2, 16\)"
    ):
        model(input_ids[:1, :1], cache=cache)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_without_attention_mask_matches_the_reference(cache_kind):
    """No mask at all (generate() drops an all-ones mask): the static buffer's empty slots must stay unseen."""
    model = tiny_model("mixed")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    reference = reference_logits(model, input_ids)
    cache = build_cache(cache_kind, model.config, max_cache_len=30)
    with torch.no_grad():
        logits = torch.cat([model(token, cache=cache).logits for token in input_ids.split([5] + [1] * 19, dim=1)], 1)
    assert (logits - reference).abs().max().item() < TOLERANCE


# Attention sinks (README, "Attention sinks"): the dynamic cache's windows keep each row's first 3 real tokens.
SINK_STACK = ["sliding_attention", "dynamic_attention", "full_attention", "selective_attention"]


@pytest.mark.parametrize(
    "backend, schedule",
    [
        ("eager", CHUNKED_PREFILL_THEN_DECODE),
        ("sdpa", CHUNKED_PREFILL_THEN_DECODE),
        ("flex_attention", [5, 20, 15]),
        pytest.param("sdpa", [1] * LENGTH, marks=pytest.mark.slow),
    ],
    ids=["eager-chunked-prefill", "sdpa-chunked-prefill", "flex-chunks", "sdpa-token-by-token"],
)
def test_dynamic_cache_with_sinks_matches_the_reference(backend, schedule):
    """Rows padded by 0, 3 and 20 have their sinks at positions 0-2, 3-5 and 20-22 of the batch: the windows keep
    those 9 columns once they leave, beside the last window - 1."""
    model = tiny_model(SINK_STACK, backend, num_sink_tokens=3, num_selected_blocks=2)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = FastGPTDynamicCache(model.config)
    logits = incremental_logits(model, input_ids, attention_mask, cache, schedule)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE
    for layer, window in zip(cache.layers, (8, 16, None, 16), strict=True):
        if window is not None:
            assert isinstance(layer, SinkTokens)
            assert (layer.sink_keys.shape[2], layer.keys.shape[2]) == (9, window - 1)
            assert layer.sink_is_real.sum(1).tolist() == [9, 6, 3]


def test_reordered_and_reselected_cache_with_sinks_continues_those_rows():
    """Beam search's row operations (`reorder_cache`, `batch_repeat_interleave`, `batch_select_indices`) move the
    kept sinks with their rows."""
    model = tiny_model(SINK_STACK, num_sink_tokens=3)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    operations = [
        (lambda cache: cache.reorder_cache(torch.tensor([2, 0, 0])), [2, 0, 0]),
        (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
        (lambda cache: cache.batch_select_indices(torch.tensor([2, 1])), [2, 1]),
    ]
    for operation, rows in operations:
        cache = FastGPTDynamicCache(model.config)
        incremental_logits(model, input_ids[:, :30], attention_mask[:, :30], cache, [30])
        operation(cache)
        moved_ids, moved_mask = input_ids[rows], attention_mask[rows]
        with torch.no_grad():
            logits = model(moved_ids[:, 30:], attention_mask=moved_mask, cache=cache).logits
        reference = reference_logits(model, moved_ids, moved_mask)[:, 30:]
        assert max_error_on_real_tokens(logits, reference, moved_mask[:, 30:]) < TOLERANCE


def test_sink_state_stays_bounded_after_400_tokens():
    model = tiny_model("mixed", dtype=torch.float32, num_sink_tokens=4)
    cache = FastGPTDynamicCache(model.config)
    tokens = torch.randint(0, model.config.vocab_size, (1, 401), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for chunk in tokens.split(23, dim=1):
            model(chunk, cache=cache, use_cache=True)
    sliding, dynamic, _, _ = cache.layers
    assert (sliding.sink_keys.shape[2], sliding.keys.shape[2]) == (4, model.config.sliding_window - 1)
    assert (dynamic.sink_keys.shape[2], dynamic.keys.shape[2]) == (4, model.config.dynamic_window - 1)


# The static cache with sinks: n slots ahead of each windowed layer's window (`StaticRolledLayer`).
STATIC_SINK_SCHEDULES = {
    "chunked-prefill-then-decode": CHUNKED_PREFILL_THEN_DECODE,
    "token-by-token": [5] + [1] * (LENGTH - 5),
    "chunk-after-ring-wrapped": [5] + [1] * 20 + [6] + [1] * (LENGTH - 31),
}


@pytest.mark.parametrize(
    "backend, schedule", [*(("eager", schedule) for schedule in STATIC_SINK_SCHEDULES), ("sdpa", "token-by-token")]
)
def test_static_cache_with_sinks_matches_the_reference(backend, schedule):
    """Rows padded by 0, 3 and 20 have their sinks at columns 0-2, 3-5 and 20-22: by the 40th token all have left
    both windows (8, 16), and the sink slots, flagged real, hold them."""
    model = tiny_model("mixed", backend, num_sink_tokens=3)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = FastGPTStaticCache(model.config, LENGTH)
    logits = incremental_logits(model, input_ids, attention_mask, cache, STATIC_SINK_SCHEDULES[schedule])
    assert max_error_on_real_tokens(logits, reference, attention_mask) < TOLERANCE
    sliding, dynamic, full, _ = cache.layers
    for layer in (sliding, dynamic):
        assert layer.sink_columns.tolist() == [[0, 1, 2], [3, 4, 5], [20, 21, 22]]
        assert layer.slot_is_real[:, :3].all()
    assert full.num_sink_tokens == 0 and full.keys.shape[2] == LENGTH


def test_compiled_static_decode_with_sinks_matches_the_reference():
    """The whole decode step compiled (fullgraph; dynamo's graph run as traced, as generate()'s compile test does):
    one graph serves 30 steps past both windows, which give the reference's logits."""
    model = tiny_model("mixed", num_sink_tokens=3)
    input_ids, attention_mask = left_padded_batch(LENGTH)
    reference = reference_logits(model, input_ids, attention_mask)
    cache = FastGPTStaticCache(model.config, LENGTH)
    logits = [incremental_logits(model, input_ids, attention_mask, cache, [10])]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    decode = torch.compile(model, fullgraph=True, backend=counting_backend)
    with torch.no_grad():
        for step in range(10, LENGTH):
            token = slice(step, step + 1)
            inputs = {"attention_mask": attention_mask[:, token], "position_ids": positions[:, token]}
            logits.append(decode(input_ids[:, token], cache=cache, **inputs).logits)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert max_error_on_real_tokens(torch.cat(logits, dim=1), reference, attention_mask) < TOLERANCE


def test_a_cache_built_without_sinks_is_refused_by_a_model_with_sinks():
    model = tiny_model("mixed", num_sink_tokens=3)
    cache = FastGPTDynamicCache(tiny_model("mixed").config)
    with pytest.raises(ValueError, match=r"\(layer_types, sliding_window, dynamic_window, compress_block_size, num_"):
        model(torch.arange(6)[None], cache=cache)
