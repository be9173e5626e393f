"""Every attention backend against the float64 dense reference, outputs and gradients.

The grid covers each layer kind alone and mixed, lengths from 1 to 299 with windows of 8 / 16 and blocks of 4 that
they are not multiples of, left-padded batches (padding positions are not compared), and grouped-query ratios;
attention sinks (`num_sink_tokens`) on sequences several windows long, and sdpa's blocked path against eager.
"""

import pytest
import torch

from fastgpt_hf.attention_compressed import global_branch_attention
from fastgpt_hf.attention_eager import eager_windowed_attention
from fastgpt_hf.attention_reference import reference_logits
from fastgpt_hf.attention_sdpa import blocked_window_attention

from .conftest import STACKS, left_padded_batch, tiny_model

BACKENDS = ["eager", "sdpa", "flex_attention"]
LENGTHS = [1, 6, 37, 131, 299]
FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 2e-4  # logits are O(1): float32 attention over a few hundred keys


def max_error_on_real_tokens(logits: torch.Tensor, reference: torch.Tensor, attention_mask) -> float:
    real = torch.ones(logits.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return (logits.double() - reference)[real].abs().max().item()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", LENGTHS, ids=lambda length: f"T{length}")
@pytest.mark.parametrize("stack", sorted(STACKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_in_float64(backend, stack, length, padded):
    """Unpadded rows run without a cache, as a training step or a benchmark prefill does (the dynamic layers'
    indexed global branch); padded ones with the cache a forward builds by default (tests/test_cache.py holds the
    cache to the uncached forward)."""
    assert reference_error(tiny_model(stack, backend), length, padded) < FLOAT64_TOLERANCE


def reference_error(model, length: int, padded: bool) -> float:
    """Largest logit error on real tokens of the model's forward against the float64 reference, on
    `left_padded_batch(length)` (its padding, through a cache, only when `padded`)."""
    input_ids, attention_mask = left_padded_batch(length)
    if not padded:
        attention_mask = None
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, use_cache=padded).logits
        reference = reference_logits(model, input_ids, attention_mask)
    return max_error_on_real_tokens(logits, reference, attention_mask)


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa2", "mha"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_ratios(backend, kv_heads):
    model = tiny_model("mixed", backend, num_key_value_heads=kv_heads)
    input_ids, attention_mask = left_padded_batch(61)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        reference = reference_logits(model, input_ids, attention_mask)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < FLOAT64_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_in_float32(backend):
    model = tiny_model("mixed", backend, dtype=torch.float32)
    input_ids, attention_mask = left_padded_batch(131)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        reference = reference_logits(model, input_ids, attention_mask)
    assert max_error_on_real_tokens(logits, reference, attention_mask) < FLOAT32_TOLERANCE


# flex_attention has no backward on the CPU; its gradients are checked on the GPU (tests/test_gpu.py). Unpadded
# inputs without a cache (a training step) take the global branch's indexed path (block means by reshape, one shared
# mask); padded ones the cache's scatter.
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [9, 70], ids=lambda length: f"T{length}")
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_backend_gradients_match_reference(backend, length, padded):
    assert_gradients_match_reference(tiny_model("mixed", backend), length, padded)


def assert_gradients_match_reference(model, length: int, padded: bool) -> None:
    """Every parameter's gradient of a random projection of the logits, the model's forward against the float64
    reference, on `left_padded_batch(length)` (its padding only when `padded`, which also runs through a cache)."""
    input_ids, attention_mask = left_padded_batch(length)
    if not padded:
        attention_mask = torch.ones_like(attention_mask)
    probe = torch.randn(*input_ids.shape, model.config.vocab_size, dtype=torch.float64) * attention_mask[..., None]

    def gradients(compute_logits) -> dict[str, torch.Tensor]:
        model.zero_grad()
        (compute_logits() * probe).sum().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    fast = gradients(lambda: model(input_ids, attention_mask=attention_mask, use_cache=padded).logits)
    reference = gradients(lambda: reference_logits(model, input_ids, attention_mask))
    for name, gradient in reference.items():
        torch.testing.assert_close(fast[name], gradient, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("length", [9, 70], ids=lambda length: f"T{length}")
def test_masked_sdpa_calls_keep_gradients_away_from_cudnn(monkeypatch, length):
    """Every masked sdpa call of a training forward (dynamic layers' global branch, padded windows) runs with cuDNN's
    kernel switched off (its backward returns NaN for some masked shapes on H100 / H200, pytorch#196678) and its key
    and value heads repeated to the query's; a forward without gradients leaves sdpa's choice as it is."""
    calls = []
    plain_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            calls.append((torch.backends.cuda.cudnn_sdp_enabled(), key.shape[1] == query.shape[1]))
        return plain_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_model("mixed", "sdpa", num_key_value_heads=2)
    input_ids, attention_mask = left_padded_batch(length)
    model(input_ids, attention_mask=attention_mask, use_cache=False).logits.sum().backward()
    assert calls and set(calls) == {(False, True)}
    calls.clear()
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, use_cache=False)
    assert calls and all(cudnn_enabled for cudnn_enabled, _ in calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("queries_per_call", [1, 7])
def test_global_branch_is_the_same_in_any_number_of_sdpa_calls(queries_per_call):
    """A long prefill's global branch goes to sdpa in chunks of queries; chunked or not, the same output."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, head_dim, memory, block_size = 2, 4, 2, 50, 8, 3, 4
    blocks = -(-length // block_size)

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    positions = torch.arange(length).expand(batch, -1)
    counts = torch.full((batch, blocks), float(block_size), dtype=torch.float64)
    arguments = (
        random(batch, heads, length, head_dim),
        positions,
        random(memory, kv_heads, head_dim),
        random(memory, kv_heads, head_dim),
        random(batch, kv_heads, blocks, head_dim),
        random(batch, kv_heads, blocks, head_dim),
        counts,
        block_size,
        head_dim**-0.5,
    )
    one_call = global_branch_attention(*arguments)
    keys_per_row = memory + blocks
    chunked = global_branch_attention(*arguments, mask_entries_per_call=batch * keys_per_row * queries_per_call)
    torch.testing.assert_close(chunked, one_call, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [3, 4, 50], ids=lambda length: f"T{length}")
def test_indexed_global_branch_is_the_scatter_path(length):
    """A prefill with nothing padded and default positions takes the global branch's indexed path (reshaped block
    means, a mask shared by the layers); with the flag off the same inputs take the general scatter path."""
    model = tiny_model("dynamic")
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(2, heads, length, 16, generator=generator, dtype=torch.float64) for heads in (4, 2, 2)
    )
    positions = torch.arange(length)[None]
    with torch.no_grad():
        indexed = attention.global_branch(query, key, value, positions, None, None, positions_are_indices=True)
        scattered = attention.global_branch(query, key, value, positions, None, None, positions_are_indices=False)
    torch.testing.assert_close(indexed, scattered, rtol=1e-12, atol=1e-12)


# Attention sinks (README, "Attention sinks"): 61 tokens are several windows (8 / 16), so a query far from the start
# sees the first tokens only through the sink clause; sdpa takes its blocked path there (more queries than a window).
SINK_STACKS = {
    "mixed": STACKS["mixed"],
    "selective": ["sliding_attention", "selective_attention", "full_attention"],
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("stack", sorted(SINK_STACKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_sinks_match_reference_in_float64(backend, stack, padded):
    model = tiny_model(SINK_STACKS[stack], backend, num_sink_tokens=3)
    assert reference_error(model, 61, padded) < FLOAT64_TOLERANCE


def test_attention_sinks_change_windowed_layers_only():
    """Past the windows the sinks change the logits; in a model of full layers, or inside every window, nothing."""
    input_ids, _ = left_padded_batch(61)
    with torch.no_grad():
        for stack, changes in (("mixed", True), ("full", False)):
            with_sinks = tiny_model(stack, num_sink_tokens=3)(input_ids).logits
            without = tiny_model(stack)(input_ids).logits
            assert (with_sinks - without).abs().max().item() > 1e-3 if changes else torch.equal(with_sinks, without)
            torch.testing.assert_close(with_sinks[:, :8], without[:, :8], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_sinks_gradients_match_reference(backend, padded):
    assert_gradients_match_reference(tiny_model("mixed", backend, num_sink_tokens=3), 37, padded)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("num_sink_tokens", [0, 1, 3, 50])
def test_blocked_sdpa_with_sinks_matches_eager(num_sink_tokens, padded):
    """sdpa's blocked path alone (29 queries after 16 cached keys, window 5): each chunk's keys start with the row's
    sinks, which lie before the keys it drops as out of every window; more sinks than keys included."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 29, 8, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(3, 2, 45, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    key_is_real = None
    if padded:
        key_is_real = torch.ones(3, 45, dtype=torch.bool)
        key_is_real[1, :4], key_is_real[2, :30] = False, False
    arguments = (query, key, value, key_is_real, 5, 0.3, 0.0, num_sink_tokens)
    blocked = blocked_window_attention(*arguments)
    exact, _ = eager_windowed_attention(*arguments)
    torch.testing.assert_close(blocked, exact, rtol=1e-12, atol=1e-12)
    if num_sink_tokens:
        without_sinks, _ = eager_windowed_attention(*arguments[:-1])
        assert (exact - without_sinks).abs().max() > 1e-3
